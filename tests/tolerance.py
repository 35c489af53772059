"""flash-attention's tolerance rule: a kernel's error against a float64 reference may be at most `factor` times
the error of plain PyTorch computing the same thing in the kernel's dtype, plus a rounding floor."""
import torch

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), "non-finite values in the result"
    return (a.double() - b.double()).abs().max().item()


def assert_close_rule(ours, pytorch_same_dtype, ref64, factor: float, what: str = ""):
    err_ours = max_err(ours, ref64)
    err_pt = max_err(pytorch_same_dtype, ref64)
    bound = factor * err_pt + FLOOR[ours.dtype] * max(1.0, ref64.abs().max().item())
    assert err_ours <= bound, f"{what}: error {err_ours:.3e} > {factor}x PyTorch's {err_pt:.3e} + floor (bound {bound:.3e})"
