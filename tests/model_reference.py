"""An independent float64 re-statement of upstream's multi-view DiT forward (cosmos-multiview.md §4.2, §5, §6),
written directly from the formulas in upstream's THWBD layout, for spot checks of ``mvmodel.networks``.

Deliberately different code from the package: explicit per-channel patch indexing, explicit softmax attention,
a Python loop over views for the cross-attention, float64 RoPE and sin-cos tables, explicit unpatchify indexing.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (the default init zeroes the AdaLN outputs): N(0, 1/fan_in) matrices,
    1 + 0.2 N(0,1) norm weights, N(0,1) embeddings/biases. Keeps ``pos_embedder.seq`` and logvar buffers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.dim() == 2 and "view_embeddings" not in name:
                r = r / math.sqrt(p.shape[1])
            elif p.dim() == 1 and name.endswith(".weight"):
                r = 1 + 0.2 * r
            p.copy_(r.to(p.dtype))


def rope_angles_f64(V: int, T: int, H: int, W: int, hd: int, fps: float, rh: float, rw: float, rt: float) -> Tensor:
    dh = hd // 6 * 2
    dt = hd - 2 * dh
    th = 10000.0 * rh ** (dh / (dh - 2))
    tw = 10000.0 * rw ** (dh / (dh - 2))
    tt = 10000.0 * rt ** (dt / (dt - 2))
    wh = th ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ww = tw ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    wt = tt ** (-torch.arange(0, dt, 2, dtype=torch.float64) / dt)
    rows = []
    for _v in range(V):
        for t in range(T):
            for h in range(H):
                for w in range(W):
                    phi = torch.cat([t / fps * 24.0 * wt, h * wh, w * ww])
                    rows.append(torch.cat([phi, phi]))
    return torch.stack(rows)


def sincos_f64(D: int, V: int, T: int, H: int, W: int) -> Tensor:
    dh = D // 6 * 2
    dt = D - 2 * dh

    def one(dim, pos):
        om = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        return torch.cat([torch.sin(pos * om), torch.cos(pos * om)])

    rows = [torch.cat([one(dt, t), one(dh, h), one(dh, w)])
            for _v in range(V) for t in range(T) for h in range(H) for w in range(W)]
    return torch.stack(rows)  # [S, D]


def _rms(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _ln(x: Tensor, eps: float = 1e-6) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _rope(x: Tensor, ang: Tensor) -> Tensor:  # x [S, B, H, d], ang [S, d]
    half = x.shape[-1] // 2
    c, s = ang.cos()[:, None, None, :half], ang.sin()[:, None, None, :half]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def _attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [S, B, H, d] x [M, B, H, d] -> [S, B, H, d]
    logits = torch.einsum("sbhd,mbhd->bhsm", q, k) / math.sqrt(q.shape[-1])
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhsm,mbhd->sbhd", p, v)


def reference_forward(sd: dict[str, Tensor], cfg, x: Tensor, timesteps: Tensor, ctx: Tensor, fps: float,
                      frame_repeat: Tensor | None = None) -> Tensor:
    """float64 forward; ``sd`` is the model's state dict (any dtype), ``cfg`` its DiTConfig (patch 2x2x1)."""
    sd = {k: v.double() for k, v in sd.items()}
    x, ctx, timesteps = x.double(), ctx.double(), timesteps.double()
    B, C, VT, H, W = x.shape
    V, D, nh = cfg.n_views, cfg.model_channels, cfg.num_heads
    hd, T = D // nh, VT // V
    Hp, Wp = H // 2, W // 2
    # channels: latent | padding (zeros) | view embedding (+ repeat-frame Linear with bias)
    e = sd["view_embeddings.weight"][None].repeat(B, 1, 1)
    if cfg.add_repeat_frame_embedding:
        fr = torch.zeros(B, V, dtype=torch.float64) if frame_repeat is None else frame_repeat.double()
        e = e + fr[..., None] * sd["repeat_frame_embedding.weight"][:, 0] + sd["repeat_frame_embedding.bias"]
    Dv = e.shape[-1]
    vchan = torch.zeros(B, Dv, VT, H, W, dtype=torch.float64)
    for v in range(V):
        vchan[:, :, v * T:(v + 1) * T] = e[:, v, :, None, None, None]
    xin = torch.cat([x, torch.zeros(B, 1, VT, H, W, dtype=torch.float64), vchan], dim=1)
    Cin = xin.shape[1]
    feats = torch.zeros(B, VT, Hp, Wp, Cin * 4, dtype=torch.float64)
    for c in range(Cin):
        for m in range(2):
            for n in range(2):
                feats[..., c * 4 + m * 2 + n] = xin[:, c, :, m::2, n::2]
    tok = feats @ sd["x_embedder.proj.1.weight"].T  # [B, VT, Hp, Wp, D]
    xs = tok.permute(1, 2, 3, 0, 4).reshape(VT * Hp * Wp, B, D)  # THW flattened, B, D
    S = xs.shape[0]
    ang = rope_angles_f64(V, T, Hp, Wp, hd, fps, cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio,
                          cfg.rope_t_extrapolation_ratio)
    extra = sincos_f64(D, V, T, Hp, Wp)[:, None, :] if cfg.extra_per_block_abs_pos_emb else 0.0

    half = D // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    arg = timesteps[:, None] * f[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    silu = torch.nn.functional.silu
    lora = silu(emb @ sd["t_embedder.1.linear_1.weight"].T) @ sd["t_embedder.1.linear_2.weight"].T
    embn = _rms(emb, sd["affline_norm.weight"])

    def heads(t):
        return t.reshape(t.shape[0], B, nh, hd)

    for i in range(cfg.num_blocks):
        xs = xs + extra
        for j, kind in enumerate(("fa", "ca", "mlp")):
            pre = f"blocks.block{i}.blocks.{j}."
            mod = silu(embn) @ sd[pre + "adaLN_modulation.1.weight"].T @ sd[pre + "adaLN_modulation.2.weight"].T + lora
            shift, scale, gate = mod.chunk(3, dim=-1)
            h = _ln(xs) * (1 + scale) + shift
            a = pre + "block.attn."
            if kind == "fa":
                q = _rope(_rms(heads(h @ sd[a + "to_q.0.weight"].T), sd[a + "to_q.1.weight"]), ang)
                k = _rope(_rms(heads(h @ sd[a + "to_k.0.weight"].T), sd[a + "to_k.1.weight"]), ang)
                vv = heads(h @ sd[a + "to_v.0.weight"].T)
                out = _attn(q, k, vv).reshape(S, B, D) @ sd[a + "to_out.0.weight"].T
            elif kind == "ca":
                M = ctx.shape[1] // V
                Sv = S // V
                out = torch.zeros_like(h)
                for v in range(V):
                    hv, cv = h[v * Sv:(v + 1) * Sv], ctx[:, v * M:(v + 1) * M].transpose(0, 1)  # [M, B, Dc]
                    q = _rms(heads(hv @ sd[a + "to_q.0.weight"].T), sd[a + "to_q.1.weight"])
                    k = _rms(heads(cv @ sd[a + "to_k.0.weight"].T), sd[a + "to_k.1.weight"])
                    vv = heads(cv @ sd[a + "to_v.0.weight"].T)
                    out[v * Sv:(v + 1) * Sv] = _attn(q, k, vv).reshape(Sv, B, D) @ sd[a + "to_out.0.weight"].T
            else:
                z = h @ sd[pre + "block.layer1.weight"].T
                z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
                out = z @ sd[pre + "block.layer2.weight"].T
            xs = xs + gate * out
    mod = silu(embn) @ sd["final_layer.adaLN_modulation.1.weight"].T @ sd["final_layer.adaLN_modulation.2.weight"].T
    shift, scale = (mod + lora[:, : 2 * D]).chunk(2, dim=-1)
    o = (_ln(xs) * (1 + scale) + shift) @ sd["final_layer.linear.weight"].T  # [S, B, 4*Cout]
    o = o.reshape(VT, Hp, Wp, B, -1)
    Cout = o.shape[-1] // 4
    y = torch.zeros(B, Cout, VT, H, W, dtype=torch.float64)
    for p1 in range(2):
        for p2 in range(2):
            for c in range(Cout):
                y[:, c, :, p1::2, p2::2] = o[..., (p1 * 2 + p2) * Cout + c].permute(3, 0, 1, 2)
    return y
