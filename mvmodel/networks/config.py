"""Typed configuration of the multi-view DiT, named after upstream's constructor keywords.

``DiTConfig`` carries exactly the hyper-parameters of upstream's ``MultiviewGeneralDIT`` that change the
numerics or the state dict (cosmos-multiview.md §4.1), plus our runtime options (attention backend, RoPE
precision quirk, camera names). ``from_upstream_kwargs`` maps upstream's kwargs dict onto it, rejecting
unknown keys and values we do not implement instead of silently ignoring them.

Presets:
* ``cosmos_7b_multiview_6view``  the released Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview net;
* ``cosmos_7b_multiview_waymo``  the 5-view / view_condition_dim 3 post-training net (Waymo example);
* ``small`` / ``tiny``           the same architecture at demo / test sizes (head dim 32 like upstream's tiny nets).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

# The released 6-view model's camera order (cosmos-multiview.md §9.2: prompt, left, right, back, back_left, back_right).
RELEASED_6VIEW_CAMERAS = ("front", "front_left", "front_right", "back", "back_left", "back_right")
# The Waymo example's view keys, in upstream's training order (§2.1): view 0 is front_left.
WAYMO_5VIEW_CAMERAS = (
    "pinhole_front_left",
    "pinhole_front",
    "pinhole_front_right",
    "pinhole_side_left",
    "pinhole_side_right",
)


@dataclass
class DiTConfig:
    """Hyper-parameters of ``MultiviewDiT`` (defaults = the released 6-view 7B, §4.1)."""

    max_img_h: int = 240
    max_img_w: int = 240
    max_frames: int = 128
    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    concat_padding_mask: bool = True
    model_channels: int = 4096
    num_blocks: int = 28
    num_heads: int = 32
    mlp_ratio: float = 4.0
    block_config: str = "FA-CA-MLP"
    crossattn_emb_channels: int = 1024
    affline_emb_norm: bool = True
    use_adaln_lora: bool = True
    adaln_lora_dim: int = 256
    rope_h_extrapolation_ratio: float = 1.0
    rope_w_extrapolation_ratio: float = 1.0
    rope_t_extrapolation_ratio: float = 2.0
    extra_per_block_abs_pos_emb: bool = True
    extra_h_extrapolation_ratio: float = 1.0
    extra_w_extrapolation_ratio: float = 1.0
    extra_t_extrapolation_ratio: float = 1.0
    n_views: int = 6
    view_condition_dim: int = 6
    concat_view_embedding: bool = True
    add_repeat_frame_embedding: bool = True
    video2world: bool = False
    """Video2World net (upstream's ``MultiviewVideoExtendGeneralDIT``): one extra input channel, the condition mask
    (1 on the conditioning latent frames), concatenated after the latent; upstream builds it by passing
    ``in_channels + 1`` to the base net, so the patch embedding sees 16 + 1 + 1 + 6 = 24 channels (96 inputs)."""
    # --- our options (not upstream kwargs) ---
    attention_backend: str = "auto"
    """"sdpa" (torch SDPA + plain PyTorch norm/RoPE), "mvkernels" (fused ops), "hybrid" (fused norm/RoPE + torch SDPA),
    "auto" (mvkernels on CUDA when present)."""
    self_attn_connectivity: Any = "all"
    """Which views each view attends to in self-attention: "all" is upstream; "self", "ringK" or a [V,V] bool tensor."""
    rope_bf16_quirk: bool = True
    """Reproduce upstream's bf16-computed RoPE angles and sin-cos embedding (what the pretrained weights saw, §5.4)."""
    camera_names: tuple[str, ...] | None = None
    """Camera name of each view index, used to remap checkpoints between camera sets (checkpoint.py)."""

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def block_types(self) -> list[str]:
        return [b.strip().lower() for b in self.block_config.split("-")]

    @property
    def patch_in_channels(self) -> int:
        """Channels entering the patch embedding: latent, condition mask (Video2World), padding mask, view embedding."""
        return self.in_channels + int(self.video2world) + int(self.concat_padding_mask) + (self.view_condition_dim if self.concat_view_embedding else 0)

    @property
    def pos_seq_len(self) -> int:
        """Length of upstream's persistent ``pos_embedder.seq`` buffer."""
        return max(self.max_img_h // self.patch_spatial, self.max_img_w // self.patch_spatial, self.max_frames // self.patch_temporal)

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"DiTConfig: {msg}")

        for name in ("model_channels", "num_blocks", "num_heads", "in_channels", "out_channels", "patch_spatial",
                     "patch_temporal", "crossattn_emb_channels", "n_views", "max_img_h", "max_img_w", "max_frames"):
            if int(getattr(self, name)) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if self.model_channels % self.num_heads:
            bad(f"model_channels={self.model_channels} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 8:
            bad(f"head dim {self.head_dim} must be even and >= 8 (RoPE splits it into t/h/w rotary pairs)")
        if self.extra_per_block_abs_pos_emb and self.model_channels % 2:
            bad(f"model_channels={self.model_channels} must be even for the sin-cos embedding")
        for b in self.block_types:
            if b not in ("fa", "ca", "mlp", "full_attn", "cross_attn"):
                bad(f"block_config={self.block_config!r}: unknown sub-block {b!r} (expected FA, CA or MLP)")
        if self.use_adaln_lora and self.adaln_lora_dim < 1:
            bad(f"adaln_lora_dim={self.adaln_lora_dim} must be >= 1")
        if self.concat_view_embedding and self.view_condition_dim < 1:
            bad(f"view_condition_dim={self.view_condition_dim} must be >= 1 with concat_view_embedding")
        if self.add_repeat_frame_embedding and not self.concat_view_embedding:
            bad("add_repeat_frame_embedding needs concat_view_embedding")
        if self.attention_backend not in ("auto", "sdpa", "mvkernels", "hybrid", "fa4"):
            bad(f"attention_backend={self.attention_backend!r} is not one of 'auto', 'sdpa', 'mvkernels', 'hybrid', "
                "'fa4'")
        if self.camera_names is not None:
            self.camera_names = tuple(self.camera_names)
            if len(self.camera_names) != self.n_views:
                bad(f"camera_names has {len(self.camera_names)} names for n_views={self.n_views}")

    def replace(self, **changes: Any) -> "DiTConfig":
        return dataclasses.replace(self, **changes)


# Upstream's net classes that add the condition-mask input channel (inference and training variants).
VIDEO2WORLD_CLASSES = ("MultiviewVideoExtendGeneralDIT", "VideoExtendMultiviewGeneralDIT")

# Upstream kwargs that do not change numerics here (layout / memory / parallelism switches) and the values we accept.
_IGNORED_UPSTREAM = {
    "block_x_format": None,  # we always run B-major tokens; the state dict is the same
    "use_checkpoint": None,  # activation checkpointing is MultiviewDiT.set_activation_checkpointing
    "use_memory_save": None,
    "legacy_patch_emb": (False,),
    "pos_emb_cls": ("rope3d",),
    "pos_emb_learnable": (False,),
    "pos_emb_interpolation": ("crop",),
    "use_cross_attn_mask": (False,),
    "layer_mask": (None,),
    "traj_condition_dim": None,
    "concat_traj_embedding": (False,),
    "extra_per_block_abs_pos_emb_type": ("sincos", "learnable"),
    "_target_": None,
    "_recursive_": None,
    # The training GeneralDIT's signature (composed into the Waymo training net config by LazyCall):
    "additional_timestamp_channels": (None, {}),  # SDXL-style extra embedders: none in the multiview nets
    "window_block_indexes": ([], ()),  # no windowed-attention blocks
    "window_sizes": ([], ()),
    # Inert for "FA-CA-MLP": only the spatial/temporal sub-blocks (SSA/TSA, refused by DiTConfig) read these,
    # and only the fps-aware absolute embeddings (not rope3d) read min/max fps, so any value builds the same net.
    "spatial_attn_win_size": None,
    "temporal_attn_win_size": None,
    "min_fps": None,
    "max_fps": None,
}


def from_upstream_kwargs(cfg: dict[str, Any], **options: Any) -> DiTConfig:
    """Build a ``DiTConfig`` from upstream's ``MultiviewGeneralDIT`` kwargs (a composed config dict).

    ``options`` are our extras (attention_backend, rope_bf16_quirk, camera_names, self_attn_connectivity).
    Raises ValueError on unknown keys and on values we do not implement.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"from_cosmos_config expects a dict of upstream kwargs, got {type(cfg).__name__}")
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    ours = {"attention_backend", "self_attn_connectivity", "rope_bf16_quirk", "camera_names"}
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in cfg.items():
        if key in known and key not in ours:
            kwargs[key] = value
        elif key in _IGNORED_UPSTREAM:
            allowed = _IGNORED_UPSTREAM[key]
            if allowed is not None and not any(value == a and type(value) is type(a) or value is a for a in allowed):
                shown = ", ".join(repr(a) for a in allowed)
                raise ValueError(f"upstream config {key}={value!r} is not supported by MultiviewDiT (supported: {shown})")
            if key == "extra_per_block_abs_pos_emb_type" and value == "learnable":
                # cosmos-multiview.md §11.1: the multiview nets build the sin-cos embedding whatever this says.
                warnings.warn("extra_per_block_abs_pos_emb_type='learnable' is built as 'sincos', as upstream's "
                              "multiview net does", stacklevel=2)
        else:
            unknown.append(key)
    # Upstream tells the Video2World net apart by its class only (its in_channels kwarg stays 16; the class adds
    # the mask channel), so the class name decides here too.
    if str(cfg.get("_target_", "")).rsplit(".", 1)[-1] in VIDEO2WORLD_CLASSES:
        kwargs["video2world"] = True
    if unknown:
        raise ValueError(f"upstream config has keys MultiviewDiT does not know: {sorted(unknown)}")
    bad_opts = set(options) - ours
    if bad_opts:
        raise ValueError(f"unknown MultiviewDiT options {sorted(bad_opts)}; expected some of {sorted(ours)}")
    kwargs.update(options)
    return DiTConfig(**kwargs)


def _build(base: dict[str, Any], overrides: dict[str, Any]) -> DiTConfig:
    merged = {**base, **overrides}
    if "n_views" in overrides and "camera_names" not in overrides:
        merged.pop("camera_names", None)  # the preset's names no longer fit a different view count
    return DiTConfig(**merged)


def cosmos_7b_multiview_6view(**overrides: Any) -> DiTConfig:
    """The released 6-view 7B net (composed inference config, §4.1)."""
    return _build(dict(camera_names=RELEASED_6VIEW_CAMERAS), overrides)


def cosmos_7b_multiview_waymo(**overrides: Any) -> DiTConfig:
    """The 5-view Waymo post-training net: view_condition_dim 3, no repeat-frame embedding.

    Upstream's training net disables the per-block sin-cos embedding while its post-trained inference config
    enables it (§11.2); we keep it enabled in both, as the pretrained weights expect it.
    """
    base = dict(n_views=5, view_condition_dim=3, add_repeat_frame_embedding=False, camera_names=WAYMO_5VIEW_CAMERAS)
    return _build(base, overrides)


def cosmos_7b_video2world_multiview_6view(**overrides: Any) -> DiTConfig:
    """The released Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview net: the 6-view Text2World net plus the
    condition-mask input channel (upstream-more.md §2; the per-block sin-cos embedding is on, as there)."""
    return _build(dict(camera_names=RELEASED_6VIEW_CAMERAS, video2world=True), overrides)


def cosmos_7b_video2world_multiview_waymo(**overrides: Any) -> DiTConfig:
    """The 5-view Video2World post-training net (``video2world_multiview_7b_example_waymo``)."""
    return cosmos_7b_multiview_waymo(**{"video2world": True, **overrides})


def small(**overrides: Any) -> DiTConfig:
    """A ~100M-parameter net for demos on one GPU: width 768, 12 blocks, head dim 64."""
    base = dict(model_channels=768, num_blocks=12, num_heads=12, adaln_lora_dim=64, crossattn_emb_channels=1024,
                n_views=5, view_condition_dim=3, add_repeat_frame_embedding=False)
    return _build(base, overrides)


def tiny(**overrides: Any) -> DiTConfig:
    """A CPU-test net: width 64, 2 heads of dim 32 (upstream's tiny nets use head dim 32), 2 blocks."""
    base = dict(model_channels=64, num_blocks=2, num_heads=2, adaln_lora_dim=16, crossattn_emb_channels=32,
                n_views=3, view_condition_dim=3, add_repeat_frame_embedding=True, max_img_h=32, max_img_w=32,
                max_frames=16)
    return _build(base, overrides)


PRESETS = {
    "cosmos_7b_multiview_6view": cosmos_7b_multiview_6view,
    "cosmos_7b_multiview_waymo": cosmos_7b_multiview_waymo,
    "cosmos_7b_video2world_multiview_6view": cosmos_7b_video2world_multiview_6view,
    "cosmos_7b_video2world_multiview_waymo": cosmos_7b_video2world_multiview_waymo,
    "small": small,
    "tiny": tiny,
}


def preset(name: str, **overrides: Any) -> DiTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)

