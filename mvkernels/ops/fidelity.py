"""Fidelity metrics of an approximate attention output against a float64 reference (tests and benches).

All three compare the whole tensor, flattened, in float64:
  cosine  = <out, ref> / (|out| |ref|)
  rel_l1  = sum |out - ref| / sum |ref|
  rmse    = sqrt(mean((out - ref)^2))            (absolute; rel_rmse = rmse / rms(ref))
The 8-bit attention gate (issue 19): cosine >= 0.999 and rel_l1 <= 0.03.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cosine", "rel_l1", "rmse", "fidelity", "GATE_COSINE", "GATE_REL_L1", "passes_gate", "make_case", "SUITE",
           "OUTLIER_SUITE", "rope_angles_1d"]

GATE_COSINE = 0.999
GATE_REL_L1 = 0.03


def _pair(out: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    if out.shape != ref.shape:
        raise ValueError(f"fidelity: shapes differ: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    return out.detach().reshape(-1).double(), ref.detach().reshape(-1).double().to(out.device)


def cosine(out: Tensor, ref: Tensor) -> float:
    a, b = _pair(out, ref)
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def rel_l1(out: Tensor, ref: Tensor) -> float:
    a, b = _pair(out, ref)
    return ((a - b).abs().sum() / b.abs().sum().clamp_min(1e-300)).item()


def rmse(out: Tensor, ref: Tensor) -> float:
    a, b = _pair(out, ref)
    return (a - b).pow(2).mean().sqrt().item()


def fidelity(out: Tensor, ref: Tensor) -> dict[str, float]:
    """{'cosine', 'rel_l1', 'rmse', 'rel_rmse', 'finite'} of ``out`` against ``ref`` (ideally float64)."""
    a, b = _pair(out, ref)
    finite = bool(torch.isfinite(a).all())
    err = rmse(out, ref)
    return {"cosine": cosine(out, ref), "rel_l1": rel_l1(out, ref), "rmse": err,
            "rel_rmse": err / max(b.pow(2).mean().sqrt().item(), 1e-300), "finite": finite}


def passes_gate(m: dict[str, float]) -> bool:
    return bool(m["finite"]) and m["cosine"] >= GATE_COSINE and m["rel_l1"] <= GATE_REL_L1


# ----------------------------------------------------------------------------------------------------------
# input suite of issue 19: (a) random, (b) outliers. Each case returns q, k, v [B, S, H, D] and the fusion kwargs.
# ----------------------------------------------------------------------------------------------------------
SUITE = ("random", "channel_outliers_x10", "channel_outliers_x30", "large_tokens", "near_one_hot", "k_offset")
OUTLIER_SUITE = SUITE[1:]


def rope_angles_1d(S: int, D: int, base: float = 10000.0) -> Tensor:
    """[S, D] fp32 rotate-half angles t * base^(-2i/D) in mvkernels' [phi, phi] layout."""
    inv = base ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2.0 / D)
    phi = torch.arange(S, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([phi, phi], dim=-1).float()


def make_case(name: str, B: int, S: int, H: int, D: int, *, device="cpu", dtype=torch.bfloat16, seed: int = 0,
              Sk: int | None = None):
    """(q, k, v, kwargs) for one case of the suite; kwargs hold rope_angles / q_norm_weight / k_norm_weight
    when the case goes through the fused norm + RoPE path. Never all zeros.

    random                 q, k, v ~ N(0, 1)
    channel_outliers_x10   4 of D channels of q and k scaled x10 BEFORE the per-head RMSNorm (fused norm + RoPE)
    channel_outliers_x30   the same, x30
    large_tokens           ~0.2% of the tokens (>= 2) of q, k and v scaled x30
    near_one_hot           each query points at one key (score gap ~20 nats): near one-hot softmax rows
    k_offset               K + a large common offset (8 x a random per-channel vector, ~8x the spread)
    """
    Sk = S if Sk is None else Sk
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, generator=g) for n in (S, Sk, Sk))
    kw = {}
    if name == "random":
        pass
    elif name.startswith("channel_outliers_x"):
        f = float(name.rsplit("x", 1)[1])
        ch = torch.randperm(D, generator=g)[:4]
        q[..., ch] *= f
        k[..., ch] *= f
        kw = dict(rope_angles=rope_angles_1d(S, D), q_norm_weight=1.0 + 0.1 * torch.randn(D, generator=g),
                  k_norm_weight=1.0 + 0.1 * torch.randn(D, generator=g))
    elif name == "large_tokens":
        for x in (q, k, v):
            n = x.shape[1]
            idx = torch.randperm(n, generator=g)[:max(2, n // 500)]
            x[:, idx] *= 30.0
    elif name == "near_one_hot":
        target = torch.randint(0, Sk, (S,), generator=g)
        kn = k / k.norm(dim=-1, keepdim=True)
        q = kn[:, target] * (20.0 * D ** 0.5) + 0.3 * q  # score gap ~20 (scale 1/sqrt(D))
    elif name == "k_offset":
        k = k + 8.0 * torch.randn(D, generator=g)
    else:
        raise ValueError(f"make_case: unknown case {name!r}; one of {SUITE}")
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, {n: t.to(device) for n, t in kw.items()}
