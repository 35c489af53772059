"""``MultiviewDiT``: the Cosmos-Predict1 multi-view DiT (cosmos-multiview.md §4.2), state-dict compatible.

forward(x [B, 16, V*T, H, W], timesteps [B], crossattn_emb [B, V*M, 1024], fps [B] | float | None,
        padding_mask [B, 1, Hpx, Wpx] | None, frame_repeat [B, V] | None,
        condition_video_input_mask [B, 1, V*T, H, W] | None (Video2World nets only)) -> [B, 16, V*T, H, W]

Views are concatenated along time, view-major. Tokens run B-major as [B, V*T'*H'*W', D] (upstream: THWBD); the
parameters, their names and all numerics are upstream's. ``state_dict()`` keys equal the checkpoint's ``net.*``
keys without the prefix (§4.3): e.g. ``x_embedder.proj.1.weight``, ``blocks.block0.blocks.0.block.attn.to_q.0.weight``,
``t_embedder.1.linear_1.weight``, ``affline_norm.weight``, ``view_embeddings.weight``, ``pos_embedder.seq``.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import RMSNorm
from .blocks import FinalLayer, GeneralDITTransformerBlock, PatchEmbed, TimestepEmbedding, Timesteps, unpatchify
from .config import DiTConfig, from_upstream_kwargs, preset
from .embeddings import RopePositionEmbedder, SinCosPosEmbAxis

CHECKPOINT_MODES = ("none", "block", "subblock")


class MultiviewDiT(nn.Module):
    """The multi-view DiT. Build with ``MultiviewDiT(DiTConfig(...))``, ``MultiviewDiT.from_preset(name)`` or
    ``MultiviewDiT.from_cosmos_config(upstream_kwargs, attention_backend=...)``; on the meta device with
    ``with torch.device("meta"): ...`` (then ``to_empty`` + ``init_weights`` or a checkpoint load)."""

    def __init__(self, config: DiTConfig | None = None, *, device=None, dtype=None, **overrides: Any) -> None:
        super().__init__()
        cfg = (config or DiTConfig()).replace(**overrides) if overrides else (config or DiTConfig())
        self.config = cfg
        D, fk = cfg.model_channels, dict(device=device, dtype=dtype)
        p, r = cfg.patch_spatial, cfg.patch_temporal
        len_h, len_w, len_t = cfg.max_img_h // p, cfg.max_img_w // p, cfg.max_frames // r

        self.x_embedder = PatchEmbed(cfg.patch_in_channels, D, p, r, **fk)
        self.pos_embedder = RopePositionEmbedder(cfg.head_dim, cfg.pos_seq_len, len_t, len_h, len_w,
                                                 cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio,
                                                 cfg.rope_t_extrapolation_ratio, cfg.rope_bf16_quirk, device=device)
        self.extra_pos_embedder = (
            SinCosPosEmbAxis(D, len_t, len_h, len_w, cfg.extra_h_extrapolation_ratio, cfg.extra_w_extrapolation_ratio,
                             cfg.extra_t_extrapolation_ratio, cfg.rope_bf16_quirk)
            if cfg.extra_per_block_abs_pos_emb else None
        )
        self.t_embedder = nn.Sequential(Timesteps(D), TimestepEmbedding(D, cfg.use_adaln_lora, **fk))
        self.blocks = nn.ModuleDict({
            f"block{i}": GeneralDITTransformerBlock(D, cfg.crossattn_emb_channels, cfg.num_heads, cfg.block_config,
                                                    cfg.mlp_ratio, cfg.use_adaln_lora, cfg.adaln_lora_dim,
                                                    cfg.attention_backend, **fk)
            for i in range(cfg.num_blocks)
        })
        self.final_layer = FinalLayer(D, p, r, cfg.out_channels, cfg.use_adaln_lora, cfg.adaln_lora_dim, **fk)
        self.affline_norm = RMSNorm(D, 1e-6, **fk) if cfg.affline_emb_norm else nn.Identity()
        if cfg.concat_view_embedding:
            self.view_embeddings = nn.Embedding(cfg.n_views, cfg.view_condition_dim, **fk)
            if cfg.add_repeat_frame_embedding:
                self.repeat_frame_embedding = nn.Linear(1, cfg.view_condition_dim, bias=True, **fk)
        self._ckpt_mode = "none"
        if not any(t.is_meta for t in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_cosmos_config(cls, cfg: dict[str, Any], *, device=None, dtype=None, **options: Any) -> "MultiviewDiT":
        """Build from upstream's ``MultiviewGeneralDIT`` kwargs (a composed config as a dict).

        ``options``: attention_backend, rope_bf16_quirk, camera_names, self_attn_connectivity.
        """
        return cls(from_upstream_kwargs(cfg, **options), device=device, dtype=dtype)

    @classmethod
    def from_preset(cls, name: str, *, device=None, dtype=None, **overrides: Any) -> "MultiviewDiT":
        return cls(preset(name, **overrides), device=device, dtype=dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh init: xavier-uniform Linears, N(0, 0.02) timestep MLP, N(0, 1) view embedding, RMSNorm weights 1,
        zeroed last AdaLN projections (each sub-block starts near identity, as DiT)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        te = self.t_embedder[1]
        nn.init.normal_(te.linear_1.weight, std=0.02)
        nn.init.normal_(te.linear_2.weight, std=0.02)
        for tb in self.blocks.values():
            for b in tb.blocks:
                nn.init.zeros_(b.adaLN_modulation[-1].weight)
        if hasattr(self, "view_embeddings"):
            nn.init.normal_(self.view_embeddings.weight)
        self.pos_embedder.seq.copy_(torch.arange(self.pos_embedder.seq.numel(), dtype=torch.float32))

    def set_activation_checkpointing(self, mode: str | bool = "subblock") -> None:
        """Recompute activations in backward: "subblock" (each FA/CA/MLP, upstream's policy), "block" (each
        transformer block), "none". Wrapping is internal, so state-dict keys do not change."""
        mode = {True: "subblock", False: "none"}.get(mode, mode)
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r} is not one of {CHECKPOINT_MODES}")
        self._ckpt_mode = mode
        for tb in self.blocks.values():
            tb.activation_checkpointing = mode == "block"
            for b in tb.blocks:
                b.activation_checkpointing = mode == "subblock"

    @property
    def activation_checkpointing(self) -> str:
        return self._ckpt_mode

    def set_attention_backend(self, backend: str) -> None:
        from .attention import BACKENDS  # noqa: PLC0415

        if backend not in BACKENDS:
            raise ValueError(f"attention_backend={backend!r} is not one of 'auto', 'sdpa', 'mvkernels', 'hybrid', "
                             "'fa4'")
        self.config.attention_backend = backend
        for tb in self.blocks.values():
            for b in tb.blocks:
                if hasattr(b.block, "attn"):
                    b.block.attn.backend = backend

    def fsdp_units(self) -> list[nn.Module]:
        """The sub-blocks (FA, CA, MLP of every block): upstream's FSDP wrap unit (84 for the 7B)."""
        return [b for tb in self.blocks.values() for b in tb.blocks]

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x: Tensor, timesteps: Tensor, crossattn_emb: Tensor) -> tuple[int, int, int, int]:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, V*T, H, W], got {tuple(x.shape)}")
        B, _, VT, H, W = x.shape
        V, p, r = cfg.n_views, cfg.patch_spatial, cfg.patch_temporal
        if VT % V or (VT // V) % r:
            raise ValueError(f"x has {VT} frames: must be n_views={V} x T with T divisible by patch_temporal={r}")
        if H % p or W % p:
            raise ValueError(f"x spatial size {H}x{W} must be divisible by patch_spatial={p}")
        if timesteps.numel() != B:
            raise ValueError(f"timesteps must have one value per sample ([{B}]), got shape {tuple(timesteps.shape)}")
        if crossattn_emb.dim() != 3 or crossattn_emb.shape[0] != B or crossattn_emb.shape[2] != cfg.crossattn_emb_channels \
                or crossattn_emb.shape[1] % V:
            raise ValueError(f"crossattn_emb must be [{B}, V*M, {cfg.crossattn_emb_channels}] with V={V}, "
                             f"got {tuple(crossattn_emb.shape)}")
        return B, VT // V, H, W

    def _input_channels(self, x: Tensor, padding_mask: Tensor | None, frame_repeat: Tensor | None,
                        cond_mask: Tensor | None = None) -> Tensor:
        """Concatenate [latent | condition mask (Video2World) | padding mask | view embedding] channels (§4.2
        steps 1-2); upstream's Video2World net appends the mask to x before the base net adds the others."""
        cfg = self.config
        B, _, VT, H, W = x.shape
        V, chans = cfg.n_views, [x]
        if cfg.video2world:
            if cond_mask is None:  # no condition frames: the mask of an unconditioned generation
                cond_mask = x.new_zeros(B, 1, VT, H, W)
            elif cond_mask.shape != (B, 1, VT, H, W):
                raise ValueError(f"condition_video_input_mask must be [{B}, 1, {VT}, {H}, {W}], "
                                 f"got {tuple(cond_mask.shape)}")
            chans.append(cond_mask.to(x.dtype))
        elif cond_mask is not None:
            raise ValueError("condition_video_input_mask given to a Text2World net (DiTConfig.video2world=False): "
                             "it has no condition-mask input channel")
        if cfg.concat_padding_mask:
            if padding_mask is None:
                pm = x.new_zeros(B, 1, H, W)
            else:
                if padding_mask.dim() != 4 or padding_mask.shape[:2] != (B, 1):
                    raise ValueError(f"padding_mask must be [{B}, 1, H, W], got {tuple(padding_mask.shape)}")
                pm = padding_mask.to(x.dtype)
                if pm.shape[-2:] != (H, W):
                    pm = F.interpolate(pm.float(), size=(H, W), mode="nearest").to(x.dtype)
            chans.append(pm[:, :, None].expand(B, 1, VT, H, W))
        if cfg.concat_view_embedding:
            e = self.view_embeddings.weight.to(x.dtype)[None].expand(B, V, -1)  # [B, V, Dv]
            if cfg.add_repeat_frame_embedding:
                fr = x.new_zeros(B, V) if frame_repeat is None else frame_repeat.to(x.dtype).reshape(B, V)
                e = e + self.repeat_frame_embedding(fr[..., None]).to(x.dtype)
            Dv = e.shape[-1]
            e = e.permute(0, 2, 1)[:, :, :, None, None, None].expand(B, Dv, V, VT // V, H, W)
            chans.append(e.reshape(B, Dv, VT, H, W))
        return torch.cat(chans, dim=1)

    @staticmethod
    def _fps_value(fps: Tensor | float | None) -> float:
        # Upstream uses the batch's first fps (one table per batch); with none given, positions are frame indices.
        if fps is None:
            return 24.0
        if isinstance(fps, Tensor):
            return float(fps.reshape(-1)[0].item())
        return float(fps)

    def forward(self, x: Tensor, timesteps: Tensor, crossattn_emb: Tensor, fps: Tensor | float | None = None,
                padding_mask: Tensor | None = None, frame_repeat: Tensor | None = None,
                crossattn_mask: Tensor | None = None, condition_video_input_mask: Tensor | None = None,
                **unused: Any) -> Tensor:
        """``crossattn_mask`` and upstream's other batch keys (image_size, num_frames, ...) are accepted and
        ignored, as upstream does with use_cross_attn_mask=False (padded text tokens are zeros, not masked)."""
        cfg = self.config
        B, T, H, W = self._check_inputs(x, timesteps, crossattn_emb)
        dtype = self.x_embedder.proj[1].weight.dtype
        x = x.to(dtype)
        p, r, V = cfg.patch_spatial, cfg.patch_temporal, cfg.n_views
        Tp, Hp, Wp = T // r, H // p, W // p

        tokens = self.x_embedder(self._input_channels(x, padding_mask, frame_repeat,
                                                      condition_video_input_mask))  # [B, V*Tp, Hp, Wp, D]
        tokens = tokens.reshape(B, V * Tp * Hp * Wp, cfg.model_channels)
        angles = self.pos_embedder.angles(V, Tp, Hp, Wp, self._fps_value(fps), x.device)
        extra = None
        if self.extra_pos_embedder is not None:
            extra = self.extra_pos_embedder.table(V, Tp, Hp, Wp, x.device, dtype)[None]

        emb, adaln_lora = self.t_embedder[1](self.t_embedder[0](timesteps.reshape(B)).to(dtype))
        emb = self.affline_norm(emb)
        context = crossattn_emb.to(dtype)
        for block in self.blocks.values():
            tokens = block(tokens, emb, context, angles, adaln_lora, extra, V, cfg.self_attn_connectivity)
        out = self.final_layer(tokens, emb, adaln_lora)
        return unpatchify(out, V * Tp, Hp, Wp, p, r, cfg.out_channels)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def forward_flops(self, n_tokens: int, text_tokens_per_view: int = 512) -> float:
        """Matmul FLOPs (2*MACs) of one forward at B=1 (§10.2 convention: norms, softmax, RoPE, adaLN ignored)."""
        cfg, D, N = self.config, self.config.model_channels, n_tokens
        M, V, Dc = text_tokens_per_view, cfg.n_views, cfg.crossattn_emb_channels
        per = {"fa": 8 * N * D * D + 4 * N * N * D, "ca": 4 * N * D * D + 4 * V * M * Dc * D + 4 * N * M * D,
               "mlp": 4 * N * D * int(D * cfg.mlp_ratio)}
        blocks = sum(per[{"full_attn": "fa", "cross_attn": "ca"}.get(b, b)] for b in cfg.block_types)
        io = 2 * N * D * (cfg.patch_in_channels * cfg.patch_spatial**2 * cfg.patch_temporal) \
            + 2 * N * D * cfg.patch_spatial**2 * cfg.patch_temporal * cfg.out_channels
        return float(cfg.num_blocks * blocks + io)


@contextlib.contextmanager
def meta_device():
    """``with meta_device(): net = MultiviewDiT(...)`` builds without allocating (FSDP2 / checkpoint loading)."""
    with torch.device("meta"):
        yield
