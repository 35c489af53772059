"""Position embeddings of the multi-view DiT: the 3D RoPE table holder and the per-block sin-cos embedding.

* ``RopePositionEmbedder`` (``pos_embedder``) keeps upstream's persistent ``seq`` buffer (128 floats, part of the
  checkpoint) and serves the RoPE angle table of ``mvkernels.rope3d_angles`` (token order (v, t, h, w), layout
  [phi, phi], bf16 quirk by default), cached per (grid, fps, device).
* ``SinCosPosEmbAxis`` (``extra_pos_embedder``) builds the non-persistent absolute embedding added at the start of
  every block (§4.2.5): channels [t | h | w], each ``[sin(p w_k), cos(p w_k)]``, identical for every view.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RopePositionEmbedder(nn.Module):
    """Angles [V*T*H*W, head_dim] float32 for the patched grid (T, H, W per view); see ``mvkernels.rope3d_angles``."""

    def __init__(self, head_dim: int, seq_len: int, len_t: int, len_h: int, len_w: int, h_ratio: float,
                 w_ratio: float, t_ratio: float, bf16_quirk: bool, device=None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.len_t, self.len_h, self.len_w = len_t, len_h, len_w
        self.ratios = (h_ratio, w_ratio, t_ratio)
        self.bf16_quirk = bf16_quirk
        # Persistent in upstream's checkpoints (net.pos_embedder.seq); not used for the math, which rebuilds it.
        self.register_buffer("seq", torch.arange(seq_len, dtype=torch.float32, device=device), persistent=True)
        self._cache: dict[tuple, Tensor] = {}

    def angles(self, n_views: int, T: int, H: int, W: int, fps: float, device: torch.device) -> Tensor:
        if T > self.len_t or H > self.len_h or W > self.len_w:
            raise ValueError(f"patched grid T={T}, H={H}, W={W} per view exceeds the model's maximum "
                             f"({self.len_t}, {self.len_h}, {self.len_w}) from max_frames/max_img_h/max_img_w")
        key = (n_views, T, H, W, float(fps), str(device))
        table = self._cache.get(key)
        if table is None:
            from mvkernels import rope3d_angles

            h, w, t = self.ratios
            table = rope3d_angles(n_views, T, H, W, self.head_dim, float(fps), h_extrapolation_ratio=h,
                                  w_extrapolation_ratio=w, t_extrapolation_ratio=t, base_fps=24.0,
                                  bf16_quirk=self.bf16_quirk).to(device)
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = table
        return table


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[len(positions), dim] float64: ``[sin(p w_k) for k < dim/2, cos(p w_k) for k < dim/2]``, w_k = 1e4^(-k/(dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


class SinCosPosEmbAxis(nn.Module):
    """Absolute embedding [V*T*H*W, D] with channels [t (D - 2*dh) | h (dh) | w (dh)], dh = D // 6 * 2.

    Computed in float64 then float32 as upstream's numpy buffers; with ``bf16_quirk`` rounded to bf16, which is
    what upstream's bf16-cast model adds. No parameters and no persistent buffers (none in the checkpoint).
    """

    def __init__(self, model_channels: int, len_t: int, len_h: int, len_w: int, h_ratio: float, w_ratio: float,
                 t_ratio: float, bf16_quirk: bool) -> None:
        super().__init__()
        dim_h = model_channels // 6 * 2
        self.dims = (model_channels - 2 * dim_h, dim_h, dim_h)  # t, h, w
        self.lens = (len_t, len_h, len_w)
        self.ratios = (t_ratio, h_ratio, w_ratio)
        self.bf16_quirk = bf16_quirk
        self._cache: dict[tuple, Tensor] = {}

    def table(self, n_views: int, T: int, H: int, W: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (n_views, T, H, W, str(device), dtype)
        out = self._cache.get(key)
        if out is not None:
            return out
        parts = []
        for dim, n, ratio, length in zip(self.dims, (T, H, W), self.ratios, self.lens):
            if n > length:
                raise ValueError(f"sin-cos embedding: grid size {n} exceeds the table length {length}")
            parts.append(sincos_1d(dim, torch.arange(length, dtype=torch.float64) / ratio)[:n].float())
        et, eh, ew = parts
        D = sum(self.dims)
        grid = torch.cat([
            et[:, None, None, :].expand(T, H, W, -1),
            eh[None, :, None, :].expand(T, H, W, -1),
            ew[None, None, :, :].expand(T, H, W, -1),
        ], dim=-1).reshape(T * H * W, D)
        if self.bf16_quirk:
            grid = grid.to(torch.bfloat16)
        out = grid.repeat(n_views, 1).to(device=device, dtype=dtype)
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = out
        return out
