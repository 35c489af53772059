"""Typed training configuration: dataclasses with docstrings, validation and dotted-key overrides.

An experiment is a function returning a :class:`Config` (see ``multiview.py``). Command-line overrides are
``section.key=value`` strings (``optimizer.lr=1e-4``, ``data.video_size=[480,848]``, ``job.name=run2``); the
value is parsed against the field's declared type, and an unknown section or key raises ``ValueError`` listing
the valid ones.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

WAYMO_VIEW_KEYS = ["pinhole_front_left", "pinhole_front", "pinhole_front_right", "pinhole_side_left",
                   "pinhole_side_right"]
PRETRAINED_7B = "checkpoints/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview/model.pt"
PRETRAINED_7B_V2W = "checkpoints/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview/model.pt"
TOKENIZER_DIR = "checkpoints/Cosmos-Tokenize1-CV8x8x8-720p"
AC_MODES = ("none", "block", "subblock", "selective")
RECIPES = ("full", "full_offload", "lora")  # trainer.recipe's named recipes (mvmodel.trainer.recipes)
PRECISIONS = ("bfloat16", "float32", "float16")


@dataclass
class JobConfig:
    """Where a run lives: ``{output_root}/{project}/{group}/{name}/`` (upstream's ``JobConfig.path_local``)."""

    project: str = "posttraining"
    group: str = "diffusion_text2world"
    name: str = "default"
    output_root: str | None = None
    """None: the ``OUTPUT_ROOT`` environment variable, else ``checkpoints``."""

    @property
    def path_local(self) -> Path:
        root = self.output_root or os.environ.get("OUTPUT_ROOT") or "checkpoints"
        return Path(root) / self.project / self.group / self.name


@dataclass
class DataConfig:
    """The multi-view dataset (``mvmodel.data.MultiviewDataset``) and its loader."""

    dataset_dir: str = "datasets/waymo"
    view_keys: list[str] = field(default_factory=lambda: list(WAYMO_VIEW_KEYS))
    num_frames: int = 57
    """Frames per view; also the tokenizer's pixel chunk (1 + 8k)."""
    video_size: tuple[int, int] = (480, 848)
    sequence_interval: int = 1
    start_frame_interval: int = 1
    caption_policy: str = "front"
    batch_size: int = 1
    num_workers: int = 8
    decoder: str = "auto"
    shuffle: bool = True
    on_error: str = "raise"
    """``raise``: a bad data file stops the run naming it; ``skip``: bad clips/samples are skipped, counted, reported."""


@dataclass
class LoRAConfig:
    """LoRA post-training (``mvmodel.networks.lora``): only adapters train; the base stays frozen in the compute
    dtype, outside the optimizer and the EMA. Set as ``model.lora.KEY=VALUE``."""

    enabled: bool = False
    rank: int = 8
    alpha: float | None = None
    """Adapter scale = alpha / rank; None: alpha = rank (scale 1, upstream's)."""
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_v"])
    """Linears of every block that get an adapter: to_q, to_k, to_v, to_out (self- and cross-attention), or
    self.to_q / cross.to_v ... for one of them, mlp.layer1, mlp.layer2. Default upstream's: q and v of both."""

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class ModelConfig:
    """The DiT preset (``mvmodel.networks.PRESETS``) plus EDM and tokenizer settings."""

    net: str = "cosmos_7b_multiview_waymo"
    net_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra ``DiTConfig`` fields, e.g. ``{"num_blocks": 4}``."""
    precision: str = "bfloat16"
    """Compute dtype of the net; master weights, gradients' reduction and EMA stay float32."""
    attention_backend: str = "auto"
    tokenizer_dir: str | None = TOKENIZER_DIR
    """Upstream's TorchScript tokenizer folder; None selects the built-in weight-free tokenizer."""
    tokenizer_dtype: str = "bfloat16"
    """dtype the TorchScript tokenizer runs in (upstream: bf16)."""
    sigma_data: float = 0.5
    p_mean: float = 0.0
    p_std: float = 1.0
    text_dropout: float = 0.2
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    # Video2World nets only (net_overrides video2world=true or a *video2world* preset), upstream's video_cond_bool:
    condition_frames_max: int = 2
    """Conditioning latent frames per sample drawn uniformly from 0..this (the same count in every view)."""
    condition_augment_p_mean: float = -3.0
    condition_augment_p_std: float = 2.0
    """The condition latents get N(0, sigma_aug^2) noise, ln sigma_aug ~ N(p_mean, p_std)."""
    condition_dropout: float = 0.2
    """Rate of unconditional samples (condition region and mask zeroed) for guidance on the input frames."""


@dataclass
class OptimizerConfig:
    """AdamW (upstream's FusedAdam in AdamW mode) with linear warm-up and gradient clipping."""

    lr: float = 2 ** -14.3
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-10
    weight_decay: float = 0.1
    warmup_steps: int = 2500
    warmup_start: float = 1e-6
    """LR multiplier at step 0; it rises linearly to 1 over ``warmup_steps``."""
    grad_clip: float = 1.0
    cpu_offload: bool = False
    """Keep fp32 master weights, Adam moments (and the EMA) in host memory; the GPU holds bf16 weights and
    gradients only. The CPU update of step k overlaps the forward of step k+1 (one GPU)."""
    offload_threads: int = 0
    """CPU threads for the offloaded update (0: all cores)."""
    offload_plan: str = "auto"
    """With ``cpu_offload``: where each bucket's fp32 master weights, Adam moments and EMA live
    (``mvmodel.trainer.memory_plan``). "auto": as much on the GPU as fits beside the activation peak, the rest in
    host memory (chosen at start; all on the host when there is no GPU); "host": all in host memory; "device": all
    on the GPU; "device:K": the first K buckets on the GPU."""


@dataclass
class EMAConfig:
    """Karras' power EMA (upstream ``PowerEMAConfig``): rate s = sigma_rel."""

    enabled: bool = True
    rate: float = 0.10


@dataclass
class CheckpointConfig:
    save_iter: int = 200
    load_path: str | None = PRETRAINED_7B
    """Pretrained weights for a fresh run (resume takes precedence). A path that does not exist is an error;
    ``none`` (or empty) starts from random weights."""
    load_strict: bool = False
    keep_last: int = 3
    """Keep the optimizer and trainer state (``_optim.pt``, ``iter_N.pt``) of the newest k checkpoints of this
    run; model files (``_reg_model.pt``, ``_ema_model.pt``) of every checkpoint stay, as upstream (0 keeps all)."""
    prune_models: bool = False
    """Also delete the model files of checkpoints older than the newest ``keep_last`` (saves disk, loses them)."""
    reg_model_dtype: str = "bfloat16"
    """dtype of ``iter_N_reg_model.pt`` (upstream: bf16). fp32 master weights then go into ``iter_N_optim.pt``."""
    resume: bool = True
    """Resume from ``latest_checkpoint.txt`` in the job folder when present (verified against the manifest;
    a damaged set falls back to the newest intact one)."""
    overwrite: bool = False
    """Start a new run in a job folder that holds checkpoints this run does not resume: they (and config.json,
    metrics.jsonl) are moved to ``<job>/replaced_<time>/``. Without it such a run refuses to start."""
    allow_config_change: bool = False
    """Resume even when a setting that changes the run's meaning (model shape, cameras, frames, resolution,
    batch size, seed, ...) differs from the job's config.json."""
    async_save: bool = True
    """Write files from a background thread (upstream: async). Rank 0 then holds the gathered model, EMA and
    optimizer state at once; set false on hosts short of memory. The offloaded optimizer always saves in place.
    A failed background write stops the run at the next step."""


@dataclass
class ParallelConfig:
    """Applied in this order: activation checkpointing, optional torch.compile per block, FSDP2 per block."""

    activation_checkpointing: str = "subblock"
    """"subblock" (upstream: recompute each FA/CA/MLP), "block", "selective" (per block, attention outputs kept:
    no attention recompute for ~0.5 GB per 7B block at 63,600 tokens) or "none"."""
    compile: bool = False
    fsdp_unit: str = "block"
    """"block" (28 units for the 7B) or "subblock" (84 units, upstream's wrap policy)."""
    reshard_after_forward: bool | int = True
    """FSDP2: free the all-gathered weights after forward (True; backward gathers them again), keep them (False:
    +2 bytes/parameter per GPU, one all-gather per unit and step less), or an int k: reshard to groups of k ranks
    (a factor of the world size; gathers inside k ranks in backward)."""
    forward_prefetch: int = 0
    """FSDP2: units whose all-gather each unit issues explicitly ahead in forward
    (``set_modules_to_forward_prefetch``); 0: FSDP2's implicit one-unit prefetch."""
    backward_prefetch: int = 0
    """FSDP2: same in backward (``set_modules_to_backward_prefetch``); 0: FSDP2's implicit prefetch."""
    compile_collectives: str = "outside"
    """With ``compile`` and context parallelism: "outside" runs the all-to-alls/all-gathers eagerly between compiled
    pieces (graph breaks); "inside" lets dynamo trace them into the compiled blocks. FSDP's collectives are always
    outside (its hooks wrap the compiled forward)."""
    per_gpu_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Choices per GPU memory class, applied at start: ``{"130": {"activation_checkpointing": "selective", ...}}``;
    the entry with the largest key (GiB) not above the GPU's memory (or ``trainer.gpu_memory_cap_gib``) overrides
    the fields it names, except those given on the command line. Empty, or on a CPU: the fields as they are."""
    context_parallel_size: int = 1
    """Ranks sharing one sample (context parallelism, ``mvmodel.trainer.context_parallel``): each holds 1/cp of
    every view's tokens; the joint self-attention exchanges heads with all-to-all (Ulysses) when num_heads divides
    by it, else all-gathers K/V. Must divide the world size; data parallelism runs over world/cp groups."""


@dataclass
class TrainerConfig:
    max_iter: int = 2000
    logging_iter: int = 200
    seed: int = 0
    device: str = "auto"
    """"auto": CUDA when available, else CPU."""
    tf32: bool = True
    max_steps_per_run: int = 0
    """Stop after this many steps of this process (0: run to max_iter); a later run resumes."""
    gpu_memory_cap_gib: float = 0.0
    """Use at most this much GPU memory (the allocator is capped; 0: no cap), e.g. 76 to run an 80 GB card's plan
    on a bigger GPU. The offloaded optimizer's memory plan budgets within it."""
    gpu_memory_margin_gib: float = 10.0
    """GPU memory the memory plan leaves unused (allocator fragmentation: reserved exceeded allocated by 6.5 GiB in
    the measured 1-GPU step; library workspaces)."""
    activation_gib: float = 0.0
    """Activation peak the memory plan budgets for (0: estimated from the recipe; set a measured figure)."""
    recipe: str = "config"
    """What to train: "config" (as the experiment says: LoRA when model.lora.enabled, full with the offloaded
    optimizer when optimizer.cpu_offload, else full FSDP), "full", "full_offload", "lora", or "auto": the first of
    full_offload and LoRA (each with the fastest activation checkpointing that fits) that fits this GPU's memory
    (or trainer.gpu_memory_cap_gib) and the host's (``mvmodel.trainer.recipes``)."""
    recipe_margin_gib: float = 5.0
    """GPU memory the recipe choice leaves free beyond its estimate (allocator fragmentation: reserved exceeded
    allocated by 4.7-6.5 GiB at the peak of the measured 1-GPU steps)."""
    max_nonfinite_steps: int = 10
    """Stop the run (with an error naming the step and its clips) after this many consecutive steps with a
    non-finite loss or gradient norm (each is skipped); 0 never stops."""


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    experiment: str = ""
    overrides: list[str] = field(default_factory=list)
    """Dotted keys set by ``apply_overrides`` (command line); they win over per-GPU-kind choices."""

    def validate(self) -> "Config":
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"config {key}: {msg}")

        d, m, o, c, p, t = self.data, self.model, self.optimizer, self.checkpoint, self.parallel, self.trainer
        if d.num_frames < 1 or (d.num_frames - 1) % 8:
            bad("data.num_frames", f"{d.num_frames} must be 1 + a multiple of 8 (causal 8x tokenizer), e.g. 9, 57")
        if len(d.video_size) != 2 or any(s % 16 for s in d.video_size):
            bad("data.video_size", f"{d.video_size} must be (h, w), both multiples of 16 (8x tokenizer, 2x2 patches)")
        if not d.view_keys:
            bad("data.view_keys", "needs at least one view")
        if d.batch_size < 1 or d.num_workers < 0:
            bad("data.batch_size/num_workers", f"got {d.batch_size}/{d.num_workers}")
        if m.tokenizer_dtype not in PRECISIONS:
            bad("model.tokenizer_dtype", f"{m.tokenizer_dtype!r} is not one of {PRECISIONS}")
        if m.precision not in PRECISIONS:
            bad("model.precision", f"{m.precision!r} is not one of {PRECISIONS}")
        if not 0 <= m.text_dropout <= 1:
            bad("model.text_dropout", f"{m.text_dropout} must be in [0, 1]")
        finite = math.isfinite
        if not (finite(o.lr) and o.lr > 0):
            bad("optimizer.lr", f"{o.lr} must be finite and > 0")
        if len(o.betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in o.betas):
            bad("optimizer.betas", f"{o.betas} must be two values in [0, 1)")
        if not (finite(o.eps) and o.eps > 0):
            bad("optimizer.eps", f"{o.eps} must be finite and > 0")
        if not (finite(o.weight_decay) and o.weight_decay >= 0):
            bad("optimizer.weight_decay", f"{o.weight_decay} must be finite and >= 0")
        if not (finite(o.grad_clip) and o.grad_clip >= 0):
            bad("optimizer.grad_clip", f"{o.grad_clip} must be finite and >= 0 (0 disables clipping)")
        if o.warmup_steps < 0:
            bad("optimizer.warmup_steps", f"{o.warmup_steps} must be >= 0")
        if not (finite(o.warmup_start) and 0 <= o.warmup_start <= 1):
            bad("optimizer.warmup_start", f"{o.warmup_start} must be in [0, 1]")
        if o.offload_threads < 0:
            bad("optimizer.offload_threads", f"{o.offload_threads} must be >= 0")
        for key in ("sigma_data", "p_std"):
            if not (finite(getattr(m, key)) and getattr(m, key) > 0):
                bad(f"model.{key}", f"{getattr(m, key)} must be finite and > 0")
        if not finite(m.p_mean):
            bad("model.p_mean", f"{m.p_mean} must be finite")
        if t.max_nonfinite_steps < 0:
            bad("trainer.max_nonfinite_steps", f"{t.max_nonfinite_steps} must be >= 0 (0: never stop)")
        if not 0 < self.ema.rate < 0.28:
            bad("ema.rate", f"{self.ema.rate} must be in (0, 0.28) (power EMA sigma_rel)")
        if c.save_iter < 1 or c.keep_last < 0:
            bad("checkpoint", f"save_iter={c.save_iter} must be >= 1 and keep_last={c.keep_last} >= 0")
        if c.reg_model_dtype not in PRECISIONS:
            bad("checkpoint.reg_model_dtype", f"{c.reg_model_dtype!r} is not one of {PRECISIONS}")
        if p.activation_checkpointing not in AC_MODES:
            bad("parallel.activation_checkpointing", f"{p.activation_checkpointing!r} is not one of {AC_MODES}")
        if p.fsdp_unit not in ("block", "subblock"):
            bad("parallel.fsdp_unit", f"{p.fsdp_unit!r} is not 'block' or 'subblock'")
        if isinstance(p.reshard_after_forward, int) and not isinstance(p.reshard_after_forward, bool) \
                and p.reshard_after_forward < 1:
            bad("parallel.reshard_after_forward", f"{p.reshard_after_forward}: expected true, false or a group size >= 1")
        if p.forward_prefetch < 0 or p.backward_prefetch < 0:
            bad("parallel.forward_prefetch/backward_prefetch", f"{p.forward_prefetch}/{p.backward_prefetch} must be >= 0")
        if p.compile_collectives not in ("outside", "inside"):
            bad("parallel.compile_collectives", f"{p.compile_collectives!r} is not 'outside' or 'inside'")
        fields = {f.name for f in dataclasses.fields(ParallelConfig)} - {"per_gpu_kind"}
        for kind, choice in p.per_gpu_kind.items():
            try:
                float(kind)
            except ValueError:
                bad("parallel.per_gpu_kind", f"key {kind!r} must be a GPU memory size in GiB, e.g. \"130\"")
            if not isinstance(choice, dict) or set(choice) - fields:
                bad("parallel.per_gpu_kind", f"entry {kind!r} must map ParallelConfig fields ({sorted(fields)}) to "
                                             f"values, got {choice!r}")
        if p.context_parallel_size < 1:
            bad("parallel.context_parallel_size", f"{p.context_parallel_size} must be >= 1")
        plan = o.offload_plan
        if plan not in ("auto", "host", "device") and not (plan.startswith("device:") and plan[7:].isdigit()):
            bad("optimizer.offload_plan", f"{plan!r} is not 'auto', 'host', 'device' or 'device:K' (the first K "
                                          "buckets on the GPU)")
        if t.gpu_memory_cap_gib < 0 or t.gpu_memory_margin_gib < 0 or t.activation_gib < 0:
            bad("trainer", f"gpu_memory_cap_gib={t.gpu_memory_cap_gib}, gpu_memory_margin_gib="
                           f"{t.gpu_memory_margin_gib} and activation_gib={t.activation_gib} must be >= 0")
        self._validate_lora()
        if t.max_iter < 1 or t.logging_iter < 1:
            bad("trainer", f"max_iter={t.max_iter} and logging_iter={t.logging_iter} must be >= 1")
        return self

    def _validate_lora(self) -> None:
        lo, t = self.model.lora, self.trainer
        if t.recipe not in RECIPES + ("config", "auto"):
            raise ValueError(f"config trainer.recipe: {t.recipe!r} is not one of {['config', 'auto', *RECIPES]}")
        if t.recipe_margin_gib < 0:
            raise ValueError(f"config trainer.recipe_margin_gib: {t.recipe_margin_gib} must be >= 0")
        if lo.rank < 1:
            raise ValueError(f"config model.lora.rank: {lo.rank} must be an integer >= 1 (e.g. 8)")
        if lo.alpha is not None and not (math.isfinite(lo.alpha) and lo.alpha > 0):
            raise ValueError(f"config model.lora.alpha: {lo.alpha} must be finite and > 0 (or none: alpha = rank)")
        from ..networks.lora import check_targets  # noqa: PLC0415

        check_targets(lo.targets)
        if lo.enabled and t.recipe in ("full", "full_offload"):
            raise ValueError(f"config model.lora.enabled=true contradicts trainer.recipe={t.recipe} (full "
                             f"post-training): choose one, e.g. trainer.recipe=lora or model.lora.enabled=false")
        if lo.enabled and self.optimizer.cpu_offload:
            raise ValueError("config model.lora.enabled=true contradicts optimizer.cpu_offload=true (the full "
                             "recipe's offloaded optimizer): LoRA keeps its few adapter weights on the GPU; set one "
                             "of them false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- overrides
def _parse_value(text: str, typ: Any, key: str) -> Any:
    """Parse ``text`` as ``typ`` (str, int, float, bool, Optional, tuple, list, dict)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _parse_value(text, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"override {key}={text!r}: " + "; ".join(errors))
    if typ is str:
        return text
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"override {key}={text!r}: expected a bool (true/false)")
    if typ in (int, float):
        try:
            val = float(text) if typ is float else int(text)
        except ValueError:
            raise ValueError(f"override {key}={text!r}: expected {typ.__name__}") from None
        return val
    if origin in (tuple, list, dict) or typ in (tuple, list, dict):
        try:
            val = json.loads(text)
        except json.JSONDecodeError:
            if origin is dict:
                raise ValueError(f"override {key}={text!r}: expected a JSON object") from None
            val = [v.strip() for v in text.strip("[]()").split(",") if v.strip()]  # a,b,c or [nan,0.9] (not JSON)
        if origin is dict:
            if not isinstance(val, dict):
                raise ValueError(f"override {key}={text!r}: expected a JSON object")
            return val
        if not isinstance(val, list):
            raise ValueError(f"override {key}={text!r}: expected a list like [a,b]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(val) != len(args):
                raise ValueError(f"override {key}={text!r}: expected {len(args)} values")
            return tuple(_parse_value(str(v), a, key) for v, a in zip(val, args))
        elem = args[0] if args else str
        out = [_parse_value(v if isinstance(v, str) else json.dumps(v), elem, key) for v in val]
        return tuple(out) if origin is tuple else out
    if typ is Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    raise ValueError(f"override {key}: unsupported field type {typ}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order; returns ``cfg`` (validated)."""
    sections = {f.name for f in dataclasses.fields(cfg) if f.name not in ("experiment", "overrides")}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. optimizer.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) not in (2, 3) or parts[0] not in sections:
            raise ValueError(f"unknown config key {key!r}: expected section.key with section one of {sorted(sections)}")
        section = getattr(cfg, parts[0])
        if len(parts) == 3:  # a nested group, e.g. model.lora.rank
            sub = getattr(section, parts[1], None)
            if not dataclasses.is_dataclass(sub):
                raise ValueError(f"unknown config key {key!r}: {parts[0]}.{parts[1]} has no sub-keys")
            section, parts = sub, [f"{parts[0]}.{parts[1]}", parts[2]]
        hints = typing.get_type_hints(type(section))
        if parts[1] not in hints:
            raise ValueError(f"unknown config key {key!r}: valid keys of {parts[0]!r} are {sorted(hints)}")
        if dataclasses.is_dataclass(getattr(section, parts[1])):
            raise ValueError(f"config key {key!r} is a group: set its keys, e.g. {key.strip()}."
                             f"{dataclasses.fields(getattr(section, parts[1]))[0].name}=...")
        setattr(section, parts[1], _parse_value(text.strip(), hints[parts[1]], key))
        cfg.overrides.append(key.strip())
    return cfg.validate()


def load_experiments(config_file: str) -> dict[str, Callable[[], Config]]:
    """The ``EXPERIMENTS`` dict of a config module, given as a file path or a dotted module name."""
    if config_file.endswith(".py") or os.sep in config_file:
        path = Path(config_file)
        if not path.is_file():
            # A repository-relative path works from anywhere once the package is installed.
            pkg_rel = Path(__file__).resolve().parents[2] / config_file
            if not pkg_rel.is_file():
                raise FileNotFoundError(f"--config {config_file}: file not found")
            path = pkg_rel
        module_name = ".".join(path.resolve().with_suffix("").parts[-3:])
        try:
            module = importlib.import_module(module_name)  # mvmodel.configs.multiview: importable by name
        except ImportError:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(config_file)
    experiments = getattr(module, "EXPERIMENTS", None)
    if not isinstance(experiments, dict):
        raise ValueError(f"--config {config_file}: the module defines no EXPERIMENTS dict")
    return experiments


def make_config(config_file: str, experiment: str | None, overrides: list[str]) -> Config:
    experiments = load_experiments(config_file)
    if not experiment:
        raise ValueError(f"no experiment given: pass experiment=NAME, one of {sorted(experiments)}")
    if experiment not in experiments:
        raise ValueError(f"unknown experiment {experiment!r}; valid experiments: {sorted(experiments)}")
    cfg = experiments[experiment]()
    cfg.experiment = experiment
    return apply_overrides(cfg, overrides)


def parse_cli(argv: list[str]) -> tuple[str, str | None, list[str], bool]:
    """``--config=FILE [--dryrun] [--] experiment=NAME key=value ...`` -> (file, experiment, overrides, dryrun)."""
    config_file, experiment, overrides, dryrun = None, None, [], False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            pass
        elif a.startswith("--config="):
            config_file = a.split("=", 1)[1]
        elif a == "--config":
            if i + 1 >= len(args):
                raise ValueError("--config needs a file, e.g. --config=mvmodel/configs/multiview.py")
            config_file = args[i + 1]
            i += 1
        elif a == "--dryrun":
            dryrun = True
        elif a.startswith("experiment="):
            experiment = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise ValueError(f"unknown option {a!r}: expected --config=FILE [--dryrun] -- experiment=NAME key=value ...")
        else:
            overrides.append(a)
        i += 1
    if config_file is None:
        raise ValueError("missing --config=FILE (e.g. --config=mvmodel/configs/multiview.py)")
    return config_file, experiment, overrides, dryrun
