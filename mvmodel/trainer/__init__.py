"""The post-training trainer: loop (``loop.py``), parallelisation (``parallelize.py``), checkpoints in upstream's
layout (``checkpoint.py``), power EMA (``ema.py``), CPU-offloaded AdamW (``offload.py``), telemetry (``monitor.py``)."""
from .checkpoint import CheckpointError, Checkpointer, iter_name
from .ema import PowerEMA, power_ema_beta, power_ema_gamma
from .loop import Trainer, TrainingError, step_generator, warmup_multiplier

__all__ = ["CheckpointError", "Checkpointer", "PowerEMA", "Trainer", "TrainingError", "iter_name", "power_ema_beta",
           "power_ema_gamma", "step_generator", "warmup_multiplier"]
