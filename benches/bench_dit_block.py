"""One 7B DiT block (FA-CA-MLP, AdaLN-LoRA), fwd+bwd in bf16 at 63,600 tokens: ours vs stock PyTorch.

Ours: ``mvmodel.networks`` blocks with ``attention_backend="auto"`` (the per-GPU measured choice) and the named
backends, under torch.compile. Peers: the same block written plainly in stock PyTorch (separate RMSNorm and
rotate-half RoPE, per-view cross-attention as a batch of views) under torch.compile, once with SDPA forced to
cuDNN ("stock") and once with FlashAttention-4 for both attentions ("stock_fa4", when flash-attn-4 imports; FA4 is
called through the opaque op ``mvkernels::fa4_attention``, as torch.compile cannot trace into FA4 itself). Both run with and without activation checkpointing of every
sub-block (upstream's policy). Reports ms per block, MFU = 3 x forward FLOPs / time / 989 TFLOP/s, peak memory.

Run on a GPU:  pytest benches/bench_dit_block.py -s --benchmark-json=run.json
               python benches/bench_dit_block.py [--small] [--blocks N] [--no-compile]
Quick check:   MVB_SMALL=1 pytest benches/bench_dit_block.py -s   (width 1024, 2,560 tokens; seconds)
Env: MVB_SMALL=1, MVB_BLOCKS (blocks in the timed stack, default 2), MVB_REP (timed repetitions), MVB_COMPILE=0,
     MVB_OURS=auto,mvkernels,hybrid,fa4 (our attention backends to time: mvkernels = mv_attention with fused
     norm/RoPE; hybrid = fused norm/RoPE + cuDNN SDPA; fa4 = fused norm/RoPE + FA4; sdpa = plain PyTorch),
     MVB_CKPT=0,1 (without / with sub-block activation checkpointing).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import cuda_time, record  # noqa: E402

from mvmodel.networks.attention import mvkernels_available  # noqa: E402
from mvmodel.networks.blocks import GeneralDITTransformerBlock  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM dense bf16 datasheet


@dataclass
class Shape:
    D: int = 4096
    heads: int = 32
    lora: int = 256
    Dc: int = 1024
    V: int = 5
    T: int = 8
    H: int = 30
    W: int = 53
    M: int = 512  # text tokens per view

    @property
    def S(self) -> int:
        return self.V * self.T * self.H * self.W

    def block_flops(self) -> float:
        """Forward matmul FLOPs of one FA-CA-MLP block (cosmos-multiview.md §10.2)."""
        N, D, V, M = self.S, self.D, self.V, self.M
        return 8 * N * D * D + 4 * N * N * D + 4 * N * D * D + 4 * V * M * self.Dc * D + 4 * N * M * D + 16 * N * D * D


SMALL = Shape(D=1024, heads=8, lora=64, V=5, T=2, H=16, W=16, M=128)


class StockBlock(nn.Module):
    """FA-CA-MLP with AdaLN-LoRA written plainly: what a straightforward PyTorch port of the published block does."""

    def __init__(self, s: Shape, device, dtype) -> None:
        super().__init__()
        D, fk = s.D, dict(device=device, dtype=dtype, bias=False)
        self.s = s
        self.lin = nn.ModuleDict({n: nn.Linear(D, D, **fk) for n in ("fa_q", "fa_k", "fa_v", "fa_o", "ca_q", "ca_o")})
        self.lin.update({n: nn.Linear(s.Dc, D, **fk) for n in ("ca_k", "ca_v")})
        self.mlp1, self.mlp2 = nn.Linear(D, 4 * D, **fk), nn.Linear(4 * D, D, **fk)
        self.norms = nn.ParameterDict({n: nn.Parameter(torch.ones(D // s.heads, device=device, dtype=dtype))
                                       for n in ("fa_q", "fa_k", "ca_q", "ca_k")})
        self.ada = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(D, s.lora, **fk), nn.Linear(s.lora, 3 * D, **fk))
                                  for _ in range(3)])
        self.checkpoint_subblocks = False
        self.attn = "cudnn"  # or "fa4"

    def _attend(self, q, k, v):
        """q, k, v [B, S, H, D] -> [B, S, H, D]."""
        if self.attn == "fa4":
            from mvkernels.ops.fa4_attention import fa4_attention
            return fa4_attention(q, k, v)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    @classmethod
    def like(cls, ours: GeneralDITTransformerBlock, s: Shape) -> "StockBlock":
        """A stock block holding our block's weights (for a numerical sanity check)."""
        w = next(ours.parameters())
        blk = cls(s, w.device, w.dtype)
        fa, ca, mlp = (b.block for b in ours.blocks)
        with torch.no_grad():
            for pre, a in (("fa", fa.attn), ("ca", ca.attn)):
                for n, seq in (("q", a.to_q), ("k", a.to_k), ("v", a.to_v), ("o", a.to_out)):
                    blk.lin[f"{pre}_{n}"].weight.copy_(seq[0].weight)
                blk.norms[f"{pre}_q"].copy_(a.to_q[1].weight)
                blk.norms[f"{pre}_k"].copy_(a.to_k[1].weight)
            blk.mlp1.weight.copy_(mlp.layer1.weight)
            blk.mlp2.weight.copy_(mlp.layer2.weight)
            for i, b in enumerate(ours.blocks):
                blk.ada[i].load_state_dict(b.adaLN_modulation.state_dict())
        return blk

    def _heads(self, t):
        return t.unflatten(-1, (self.s.heads, -1))

    def _rope(self, t, cos, sin):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    def _sub(self, i, x, emb, lora, ctx, cos, sin):
        shift, scale, gate = (m[:, None] for m in (self.ada[i](emb) + lora).chunk(3, dim=1))
        h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
        B, S, D = h.shape
        L = self.lin
        if i == 0:
            q = self._rope(F.rms_norm(self._heads(L["fa_q"](h)), (D // self.s.heads,), self.norms["fa_q"], 1e-6), cos, sin)
            k = self._rope(F.rms_norm(self._heads(L["fa_k"](h)), (D // self.s.heads,), self.norms["fa_k"], 1e-6), cos, sin)
            v = self._heads(L["fa_v"](h))
            out = L["fa_o"](self._attend(q, k, v).reshape(B, S, D))
        elif i == 1:
            V = self.s.V
            q = F.rms_norm(self._heads(L["ca_q"](h)), (D // self.s.heads,), self.norms["ca_q"], 1e-6)
            k = F.rms_norm(self._heads(L["ca_k"](ctx)), (D // self.s.heads,), self.norms["ca_k"], 1e-6)
            v = self._heads(L["ca_v"](ctx))
            q, k, v = (t.reshape(B * V, t.shape[1] // V, *t.shape[2:]) for t in (q, k, v))
            out = L["ca_o"](self._attend(q, k, v).reshape(B, S, D))
        else:
            out = self.mlp2(F.gelu(self.mlp1(h)))
        return x + gate * out

    def forward(self, x, emb, lora, ctx, cos, sin):
        for i in range(3):
            if self.checkpoint_subblocks:
                x = checkpoint(self._sub, i, x, emb, lora, ctx, cos, sin, use_reentrant=False)
            else:
                x = self._sub(i, x, emb, lora, ctx, cos, sin)
        return x


def _inputs(s: Shape, device="cuda", dtype=torch.bfloat16):
    import mvkernels

    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(1, s.S, s.D, device=device, dtype=dtype, generator=g)).requires_grad_()
    emb = torch.randn(1, s.D, device=device, dtype=dtype, generator=g)
    lora = 0.1 * torch.randn(1, 3 * s.D, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(1, s.V * s.M, s.Dc, device=device, dtype=dtype, generator=g)
    angles = mvkernels.rope3d_angles(s.V, s.T, s.H, s.W, s.D // s.heads, 10.0, t_extrapolation_ratio=2.0).to(device)
    return x, emb, lora, ctx, angles


def _init_(module: nn.Module) -> None:
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.fill_(1.0)


def run(small: bool = False, n_blocks: int = 2, rep: int | None = None, compile_: bool = True, benchmark=None,
        ours_backends: list[str] | None = None, ckpt_modes: tuple[bool, ...] = (False, True)):
    """Time every ``ours_backends`` variant ("mvkernels", "hybrid", "sdpa") and the stock block, w/o and with
    activation checkpointing; returns {variant: {ms, mfu, peak_gib, act_gib}} (ms per block)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = SMALL if small else Shape()
    rep = rep or (20 if small else 5)
    dt = torch.bfloat16
    from mvkernels.ops import fa4_attention

    has_fa4 = fa4_attention.available()
    if ours_backends is None:
        ours_backends = ["auto", "mvkernels", "hybrid"] if mvkernels_available() else ["sdpa"]
        ours_backends += ["fa4"] if has_fa4 else []
    backend = ours_backends[0]
    torch.manual_seed(0)
    ours = nn.ModuleList([GeneralDITTransformerBlock(s.D, s.Dc, s.heads, "FA-CA-MLP", 4.0, True, s.lora, backend,
                                                     device="cuda", dtype=dt) for _ in range(n_blocks)])
    _init_(ours)
    stock = nn.ModuleList([StockBlock.like(b, s) for b in ours])
    x, emb, lora, ctx, angles = _inputs(s)
    cos, sin = angles.cos()[:, None, :].to(dt), angles.sin()[:, None, :].to(dt)
    grad = torch.randn_like(x)
    flops = 3 * s.block_flops()
    base_mem = torch.cuda.memory_allocated()

    def stack_ours(xx):
        for b in ours:
            xx = b(xx, emb, ctx, angles, lora, None, s.V, "all")
        return xx

    def stack_stock(xx):
        for b in stock:
            xx = b(xx, emb, lora, ctx, cos, sin)
        return xx

    results = {}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        with torch.no_grad():  # sanity: both compute the same block
            a, b_ = stack_ours(x), stack_stock(x)
            rel = ((a.float() - b_.float()).norm() / b_.float().norm()).item()
        print(f"\n[dit block] {s.S} tokens, width {s.D}, {n_blocks} blocks, ours backends={ours_backends}; "
              f"ours vs stock output rel. diff {rel:.2e}")
        assert rel < 5e-2, f"ours and the stock block disagree (rel {rel})"
        variants = [(f"ours_{b}", b) for b in ours_backends] + [("stock", None)]
        variants += [("stock_fa4", None)] if has_fa4 else []
        for ckpt in ckpt_modes:
            for b in ours:
                for sb in b.blocks:
                    sb.activation_checkpointing = ckpt
            for b in stock:
                b.checkpoint_subblocks = ckpt
            for name, attn_backend in variants:
                for b in stock:
                    b.attn = "fa4" if name == "stock_fa4" else "cudnn"
                if attn_backend is not None:
                    for b in ours:
                        for sb in b.blocks:
                            if hasattr(sb.block, "attn"):
                                sb.block.attn.backend = attn_backend
                fn = stack_stock if attn_backend is None else stack_ours
                torch._dynamo.reset()
                f = torch.compile(fn) if compile_ else fn
                params = list((stock if attn_backend is None else ours).parameters())

                def step():
                    for p in params:
                        p.grad = None
                    x.grad = None
                    f(x).backward(grad)

                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                peak_total = torch.cuda.max_memory_allocated() / 2**30
                peak = peak_total - base_mem / 2**30
                ms = cuda_time(step, warmup=2, rep=rep, flush_l2=False) / n_blocks
                key = f"{name}{'_ckpt' if ckpt else ''}"
                results[key] = dict(ms=ms, mfu=flops / (ms * 1e-3) / PEAK_FLOPS, peak_gib=peak_total, act_gib=peak)
                print(f"  {key:22s} {ms:9.2f} ms/block  {flops / (ms * 1e-3) / 1e12:6.0f} TFLOP/s  "
                      f"MFU {100 * results[key]['mfu']:5.1f}%  peak {peak_total:6.2f} GiB "
                      f"({peak:6.2f} above weights+inputs)")
    r = results

    def best_stock(key):
        suffix = "_ckpt" if key.endswith("_ckpt") else ""
        return min(r[n + suffix]["ms"] for n in ("stock", "stock_fa4") if n + suffix in r)

    for key in r:
        if key.startswith("ours"):
            print(f"  {key} vs the faster stock peer: {best_stock(key) / r[key]['ms']:.3f}x")
    if benchmark is not None:
        for key, v in results.items():
            extra = {}
            if key.startswith("ours"):
                extra["ratio_ours_vs"] = best_stock(key) / v["ms"]
            record(benchmark, key, v["ms"], tracked=key.startswith("ours"), mfu=v["mfu"], peak_gib=v["peak_gib"],
                   act_gib=v["act_gib"], tokens=s.S, blocks=n_blocks, **extra)
    return results


def test_dit_block(benchmark):
    small = os.environ.get("MVB_SMALL", "0") == "1"
    run(small=small, n_blocks=int(os.environ.get("MVB_BLOCKS", "2")),
        rep=int(os.environ["MVB_REP"]) if "MVB_REP" in os.environ else None,
        compile_=os.environ.get("MVB_COMPILE", "1") != "0", benchmark=benchmark,
        ours_backends=os.environ["MVB_OURS"].split(",") if os.environ.get("MVB_OURS") else None,
        ckpt_modes=tuple(x == "1" for x in os.environ.get("MVB_CKPT", "0,1").split(",")))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", default=os.environ.get("MVB_SMALL", "0") == "1")
    ap.add_argument("--blocks", type=int, default=int(os.environ.get("MVB_BLOCKS", "2")))
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--ours", default=os.environ.get("MVB_OURS"), help="comma list of our backends to time")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dit_block needs a CUDA GPU")
    run(small=a.small, n_blocks=a.blocks, rep=a.rep, compile_=not a.no_compile,
        ours_backends=a.ours.split(",") if a.ours else None)
