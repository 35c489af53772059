"""3D RoPE angle table of the Cosmos multi-view DiT, bit-exact to upstream (cosmos-multiview.md §5).

Upstream builds the table from buffers that the model's ``.to(bfloat16)`` turned into bf16, so the frequencies,
positions and their products are rounded to bf16 at every op (§5.4); the pretrained weights saw those quantised
angles. ``bf16_quirk=True`` replays exactly those ops in bf16 and upcasts at the end; False computes in fp32.
"""
from __future__ import annotations

import torch

__all__ = ["rope3d_angles"]


def _axis_dims(head_dim: int) -> tuple[int, int, int]:
    dim_h = head_dim // 6 * 2
    return dim_h, dim_h, head_dim - 2 * dim_h  # (h, w, t): 42, 42, 44 for head_dim 128


def rope3d_angles(n_views: int, T: int, H: int, W: int, head_dim: int, fps: float, *,
                  h_extrapolation_ratio: float = 1.0, w_extrapolation_ratio: float = 1.0,
                  t_extrapolation_ratio: float = 1.0, base_fps: float = 24.0, bf16_quirk: bool = True) -> torch.Tensor:
    """Angles ``[n_views*T*H*W, head_dim]`` float32 in token order ``(v, t, h, w)`` and layout ``[phi, phi]``.

    ``phi = [p_t*w_t (d_t/2) | p_h*w_h (d_h/2) | p_w*w_w (d_w/2)]`` with ``p_t = t / fps * base_fps``,
    ``p_h = h``, ``p_w = w`` (T, H, W are the patched latent grid per view). Every view gets the same table:
    upstream's position never includes the view index. NTK extrapolation: ``theta_a = 10000 * r_a^(d_a/(d_a-2))``.
    """
    for name, v in (("n_views", n_views), ("T", T), ("H", H), ("W", W)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"rope3d_angles: {name} must be a positive int, got {v!r}")
    if not isinstance(head_dim, int) or head_dim < 6 or head_dim % 2:
        raise ValueError(f"rope3d_angles: head_dim must be an even int >= 6, got {head_dim!r}")
    fps = float(fps)
    if not fps > 0:
        raise ValueError(f"rope3d_angles: fps must be > 0, got {fps}")
    dim_h, dim_w, dim_t = _axis_dims(head_dim)
    if dim_h < 4:
        raise ValueError(f"rope3d_angles: head_dim {head_dim} leaves {dim_h} dims per spatial axis; need >= 4")
    dt = torch.bfloat16 if bf16_quirk else torch.float32

    # Same ops, same order as upstream (python-float base ** tensor exponent, reciprocal, outer products).
    seq = torch.arange(max(T, H, W), dtype=torch.float32).to(dt)
    spatial_range = (torch.arange(0, dim_h, 2)[: dim_h // 2].float() / dim_h).to(dt)
    temporal_range = (torch.arange(0, dim_t, 2)[: dim_t // 2].float() / dim_t).to(dt)
    h_theta = 10000.0 * h_extrapolation_ratio ** (dim_h / (dim_h - 2))
    w_theta = 10000.0 * w_extrapolation_ratio ** (dim_w / (dim_w - 2))
    t_theta = 10000.0 * t_extrapolation_ratio ** (dim_t / (dim_t - 2))
    h_freqs = 1.0 / (h_theta ** spatial_range)
    w_freqs = 1.0 / (w_theta ** spatial_range)
    t_freqs = 1.0 / (t_theta ** temporal_range)
    # Upstream divides the positions by the batch's fps tensor (bf16 after the low-precision cast).
    fps_t = torch.tensor([fps], dtype=dt)
    emb_t = torch.outer(seq[:T] / fps_t * base_fps, t_freqs)
    emb_h = torch.outer(seq[:H], h_freqs)
    emb_w = torch.outer(seq[:W], w_freqs)

    phi = torch.cat([
        emb_t[:, None, None, :].expand(T, H, W, -1),
        emb_h[None, :, None, :].expand(T, H, W, -1),
        emb_w[None, None, :, :].expand(T, H, W, -1),
    ], dim=-1).float()
    table = torch.cat([phi, phi], dim=-1).reshape(T * H * W, head_dim)
    return table.repeat(n_views, 1)
