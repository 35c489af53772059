"""Typed training configs and named experiments (``multiview.py``; upstream experiment names)."""
from .base import (CheckpointConfig, Config, DataConfig, EMAConfig, JobConfig, ModelConfig, OptimizerConfig,
                   ParallelConfig, TrainerConfig, apply_overrides, load_experiments, make_config, parse_cli)

__all__ = [
    "CheckpointConfig", "Config", "DataConfig", "EMAConfig", "JobConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "TrainerConfig", "apply_overrides", "load_experiments", "make_config", "parse_cli",
]
