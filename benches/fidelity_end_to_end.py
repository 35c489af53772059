"""End-to-end fidelity of the 8-bit inference precisions, on one GPU; results as JSON and a printed table.

    python benches/fidelity_end_to_end.py --out DIR [--demo] [--skip_7b]

(a) The 7B 6-view net with random weights (as ``bench_inference_step.py`` builds it) runs the 35-step guided
    sampler from one seed in fp32 (TF32 off, SDPA attention: the reference), in bf16 (the floor), and with each
    8-bit precision; each final latent's relative L2 error against fp32 is reported next to the bf16 one, and for
    "fp8" and "fp8-attn" per choice of bf16 blocks x bf16 steps (to choose the defaults). The default shape is 6
    views x 9 frames at 256x384 (2 latent frames of 16x24 patches: 768 tokens per view, 4,608 in all, batch 2),
    so that the fp32 run fits the ~4-minute budget; ``--frames/--height/--width`` change it.
(b) During the bf16 run, the Q/K/V entering the self-attention of ``--capture_blocks`` at ``--capture_steps``
    (several noise levels) are saved for the kernel fidelity suite: ``DIR/qkv/7b_block{b}_step{i}.pt`` holding
    q, k, v [1, S, heads, 128] bf16 (the conditional sample, the first ``--capture_heads`` heads; before the
    per-head RMSNorm, exactly what ``mv_attention_int8`` receives), the norm weights, eps, sigma, n_views, the
    connectivity and the name of the RoPE angles file beside it (``7b_rope_angles.pt``, [S, 128] fp32).
(c) ``--demo``: trains the demo model (``mvmodel.demo``'s data and recipe) on the GPU with 2 heads of dim 64
    instead of its 4 of dim 32 (the 8-bit kernel takes head dims 64 and 128), samples the same seed in bf16 and in
    each 8-bit precision, decodes, and reports the PSNR of the decoded frames against the bf16 ones (target
    >= 30 dB); its Q/K/V are captured too (``DIR/qkv/demo_*.pt``).

A precision whose part cannot run here (no Hopper, no ``mvkernels.ops.mv_attention_int8``, no torchao) is
reported unavailable.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES_8BIT = ("fp8-attn", "fp8-linear", "fp8")


def _blocks_list(text: str) -> list[tuple[int, ...]]:
    from mvmodel.networks.precision import parse_blocks

    return [parse_blocks(t) for t in text.split(";")]


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} {text!r}: expected comma-separated integers") from None


# ---------------------------------------------------------------------------------------------- Q/K/V capture
class QKVCapture:
    """Wraps ``Attention.core`` of chosen self-attentions (instance attribute, eager mode) and saves its inputs at
    chosen steps. ``step`` is set by the sampling loop; None disables capturing."""

    def __init__(self, net, blocks: list[int], steps: list[int], heads: int, out: Path, prefix: str) -> None:
        self.step, self.sigma, self.steps, self.saved = None, None, set(steps), []
        tbs = list(net.blocks.values())
        self.attns = {b % len(tbs): tbs[b % len(tbs)].blocks[0].block.attn for b in blocks}  # the FA sub-block
        for b, attn in self.attns.items():
            attn.core = self._wrap(attn, b, heads, out, prefix)

    def _wrap(self, attn, block: int, heads: int, out: Path, prefix: str):
        core = type(attn).core.__get__(attn)

        def capture(q, k, v, rope_angles, n_views, connectivity):
            if self.step in self.steps:
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"{prefix}_block{block}_step{self.step}.pt"
                torch.save({"q": q[:1, :, :heads].contiguous().cpu(), "k": k[:1, :, :heads].contiguous().cpu(),
                            "v": v[:1, :, :heads].contiguous().cpu(),
                            "q_norm_weight": attn.to_q[1].weight.detach().cpu(),
                            "k_norm_weight": attn.to_k[1].weight.detach().cpu(), "eps": attn.to_q[1].eps,
                            "rope_angles": self._angles_file(rope_angles, out, prefix), "n_views": n_views,
                            "connectivity": connectivity, "sigma": self.sigma, "step": self.step, "block": block},
                           path)
                self.saved.append(str(path))
            return core(q, k, v, rope_angles, n_views, connectivity)

        return capture

    @staticmethod
    def _angles_file(rope_angles, out: Path, prefix: str) -> str | None:
        """The RoPE angles [S, head_dim] fp32 are the same for every block and step: saved once, by name."""
        if rope_angles is None:
            return None
        path = out / f"{prefix}_rope_angles.pt"
        if not path.exists():
            torch.save(rope_angles.cpu(), path)
        return path.name

    def remove(self) -> None:
        for attn in self.attns.values():
            del attn.core


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(net, noise, cond, uncond, sigmas, guidance, capture: QKVCapture | None = None) -> torch.Tensor:
    """The pipeline's guided Euler loop (``euler_step_cfg``), precision switched per step; fp32 latent out."""
    from mvmodel.inference.pipeline import euler_step_cfg, net_dtype
    from mvmodel.networks.precision import set_sampling_step

    x = noise.to(net_dtype(net))
    for i in range(len(sigmas) - 1):
        set_sampling_step(net, i)
        if capture is not None:
            capture.step, capture.sigma = i, sigmas[i]
        x = euler_step_cfg(net, x, sigmas[i], sigmas[i + 1], cond, uncond, guidance)
    if capture is not None:
        capture.step = None
    return x.float()


def _cast_parameters(net, dtype: torch.dtype) -> None:
    """Parameters only: the fp32 buffers (RoPE positions) stay fp32, as in a net built in either dtype."""
    for p in net.parameters():
        p.data = p.data.to(dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def run_7b(args, out: Path) -> dict:
    from bench_inference_step import DEVICE, build_net  # the bench's 7B build: meta -> GPU -> random init

    from mvmodel.diffusion import karras_sigmas
    from mvmodel.inference.pipeline import make_condition
    from mvmodel.networks.precision import Precision, apply_precision, set_precision_mode

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    V, lt = 6, 1 + (args.frames - 1) // 8
    h, w = args.height // 8, args.width // 8
    t0 = time.time()
    net, _ = build_net(args.small)  # the bench's bf16 net; its parameters go fp32 for the reference run (same values)
    _cast_parameters(net, torch.float32)
    dev = torch.device(DEVICE)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    text = torch.randn(V * 512, 1024, generator=g) * 0.2
    text[torch.rand(V * 512, generator=g) > 0.1] = 0  # T5-like: ~50 valid tokens per view
    noise = torch.randn(1, 16, V * lt, h, w, generator=g) * math.sqrt(80.0**2 + 1)
    sigmas = karras_sigmas(args.steps).float().tolist()
    tokens = V * lt * (h // 2) * (w // 2)
    res = {"shape": {"views": V, "frames": args.frames, "height": args.height, "width": args.width,
                     "tokens": tokens, "batch": 2, "steps": args.steps, "guidance": args.guidance, "seed": args.seed},
           "runs": {}}
    print(f"[{'small net' if args.small else '7B'}] {tokens} tokens x batch 2, {args.steps} steps, built in "
          f"{time.time() - t0:.0f} s", flush=True)

    def cond_for(dtype):
        return make_condition(text, V, 24.0, args.height, args.width, [0, 0, 0, 0, 10, 10], dev, dtype)

    t0 = time.time()
    net.set_attention_backend("sdpa")  # the fp32 reference: plain PyTorch norms/RoPE, SDPA in fp32
    ref = sample(net, noise.to(dev), *cond_for(torch.float32), sigmas, args.guidance)
    res["runs"]["fp32"] = {"rel_err_vs_fp32": 0.0, "seconds": time.time() - t0}
    print(f"  fp32 reference {time.time() - t0:.0f} s", flush=True)
    _cast_parameters(net, torch.bfloat16)  # exact: the values came from bf16
    net.set_attention_backend("auto")
    cond, uncond = cond_for(torch.bfloat16)

    capture = QKVCapture(net, args.capture_blocks, args.capture_steps, args.capture_heads, out / "qkv", "7b")
    t0 = time.time()
    floor = rel_err(sample(net, noise.to(dev), cond, uncond, sigmas, args.guidance, capture), ref)
    capture.remove()
    res["runs"]["bf16"] = {"rel_err_vs_fp32": floor, "seconds": time.time() - t0}
    res["captures"] = capture.saved
    print(f"  bf16 floor {floor:.4e} ({time.time() - t0:.0f} s); {len(capture.saved)} Q/K/V captures", flush=True)

    have = apply_precision(net, Precision("fp8", bf16_blocks=(), bf16_steps=0))  # every part this GPU can run
    res["converted"] = have.mode
    settings = [(m, (0, -1), 0) for m in MODES_8BIT]
    # The sweep: the full 8-bit mode this GPU runs, and 8-bit attention alone (the risky part) when it runs.
    sweep = {"fp8": ("fp8", "fp8-attn"), "bf16": ()}.get(have.mode, (have.mode,))
    settings += [(m, b, s) for m in sweep for b in args.sweep_blocks for s in args.sweep_steps
                 if (b, s) != ((0, -1), 0)]
    for mode, blocks, steps in settings:
        key = f"{mode} bf16_blocks={','.join(map(str, blocks)) or 'none'} bf16_steps={steps}"
        try:
            set_precision_mode(net, mode, bf16_blocks=blocks, bf16_steps=steps)
        except ValueError as exc:
            res["runs"][key] = {"unavailable": str(exc)}
            continue
        t0 = time.time()
        err = rel_err(sample(net, noise.to(dev), cond, uncond, sigmas, args.guidance), ref)
        res["runs"][key] = {"rel_err_vs_fp32": err, "vs_floor": err / floor, "seconds": time.time() - t0}
        print(f"  {key:48s} {err:.4e} ({err / floor:.2f}x the bf16 floor, {time.time() - t0:.0f} s)", flush=True)
    return res


# ---------------------------------------------------------------------------------------------- demo model
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Decoded frames in [-1, 1] -> PSNR in dB on the [0, 1] scale."""
    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def run_demo(args, out: Path) -> dict:  # not under no_grad: it trains first
    from bench_inference_step import DEVICE

    from mvmodel import demo
    from mvmodel.configs import make_config
    from mvmodel.data import MultiviewDataset
    from mvmodel.diffusion import condition_uncondition, initial_noise, karras_sigmas
    from mvmodel.networks import MultiviewDiT, load_cosmos_checkpoint, preset
    from mvmodel.networks.precision import Precision, apply_precision, set_precision_mode
    from mvmodel.tokenizer import load_tokenizer
    from mvmodel.trainer.checkpoint import Checkpointer, iter_name

    root = out / "demo"
    ds, _ = demo.prepare_data(root, clips=demo.CLIPS, frames=demo.CLIP_FRAMES, size=demo.SIZE)
    tok_dir = demo.export_tokenizer(ds, root, num_frames=demo.FRAMES, size=demo.SIZE)
    net_over = dict(make_config("mvmodel/configs/multiview.py", "text2world_multiview_demo", []).model.net_overrides)
    net_over["num_heads"] = 2  # head dim 64 (the demo's 4 heads of 32 are below the 8-bit kernel's head dims)
    t0 = time.time()
    _, job = demo.train(ds, tok_dir, root, args.demo_steps, DEVICE, fresh=True,
                        extra_overrides=(f"model.net_overrides={json.dumps(net_over)}",))
    train_s = time.time() - t0
    cfg = json.loads((job / "config.json").read_text())
    ck = Checkpointer(job / "checkpoints")
    over = dict(cfg["model"]["net_overrides"], camera_names=tuple(cfg["model"]["net_overrides"]["camera_names"]))
    net = MultiviewDiT(preset(cfg["model"]["net"], **over)).eval().requires_grad_(False)
    load_cosmos_checkpoint(net, ck.dir / iter_name(ck.latest(), "ema_model"), strict=True)
    net = net.to(DEVICE, torch.bfloat16)
    d = cfg["data"]
    V = len(d["view_keys"])
    tok = load_tokenizer(cfg["model"]["tokenizer_dir"], pixel_chunk_duration=d["num_frames"], device=DEVICE,
                         dtype=torch.float32)
    item = MultiviewDataset(ds, num_frames=d["num_frames"], view_keys=d["view_keys"],
                            video_size=tuple(d["video_size"]), return_captions=True)[0]
    batch = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
    cond, uncond = condition_uncondition(batch, n_views=V, device=torch.device(DEVICE))
    shape = (1, 16, V * (1 + (d["num_frames"] - 1) // 8), d["video_size"][0] // 8, d["video_size"][1] // 8)
    noise = initial_noise(shape, generator=torch.Generator().manual_seed(args.seed), device=DEVICE)
    sigmas = karras_sigmas(args.steps).float().tolist()

    @torch.no_grad()
    def decoded(capture=None):
        z = sample(net, noise, cond, uncond, sigmas, args.demo_guidance, capture)
        return tok.decode_views(z.float() / 0.5, V)[0].float().cpu()

    capture = QKVCapture(net, list(range(len(net.blocks))), args.capture_steps, 2, out / "qkv", "demo")
    ref = decoded(capture)
    capture.remove()
    res = {"train_steps": args.demo_steps, "train_seconds": train_s, "head_dim": net.config.head_dim,
           "tokens": (shape[2] * shape[3] * shape[4]) // 4, "captures": capture.saved, "psnr_db_vs_bf16": {}}
    have = apply_precision(net, Precision("fp8", bf16_blocks=(), bf16_steps=0))
    res["converted"] = have.mode
    for mode in MODES_8BIT:
        for blocks in ((), (0, -1)):
            key = f"{mode} bf16_blocks={','.join(map(str, blocks)) or 'none'}"
            try:
                set_precision_mode(net, mode, bf16_blocks=blocks, bf16_steps=0)
            except ValueError as exc:
                res["psnr_db_vs_bf16"][key] = f"unavailable: {exc}"
                continue
            res["psnr_db_vs_bf16"][key] = p = psnr(decoded(), ref)
            print(f"  demo {key:32s} PSNR {p:6.2f} dB vs bf16", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="folder for fidelity.json and the Q/K/V captures")
    ap.add_argument("--frames", type=int, default=9, help="frames per view, 1 + 8k (default 9: 2 latent frames)")
    ap.add_argument("--height", type=int, default=256, help="pixels, multiple of 16 (default 256)")
    ap.add_argument("--width", type=int, default=384, help="pixels, multiple of 16 (default 384)")
    ap.add_argument("--steps", type=int, default=35, help="sampling steps (default 35)")
    ap.add_argument("--guidance", type=float, default=7.0, help="7B guidance (default 7)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep_blocks", default="none;0,-1;0,1,-2,-1",
                    help="';'-separated bf16_blocks choices for the sweep ('none' = every block 8-bit)")
    ap.add_argument("--sweep_steps", default="0,3", help="comma-separated bf16_steps choices for the sweep")
    ap.add_argument("--capture_blocks", default="0,13,27", help="7B blocks whose Q/K/V are saved")
    ap.add_argument("--capture_steps", default="0,17,34", help="sampling steps (noise levels) captured")
    ap.add_argument("--capture_heads", type=int, default=2, help="heads kept per capture (all tokens)")
    ap.add_argument("--demo", action="store_true", help="also train the demo model and report PSNR (part c)")
    ap.add_argument("--demo_steps", type=int, default=300, help="demo training iterations (default 300)")
    ap.add_argument("--demo_guidance", type=float, default=2.0, help="demo sampling guidance (its default 2)")
    ap.add_argument("--skip_7b", action="store_true", help="only the demo part")
    ap.add_argument("--small", action="store_true",
                    help="the bench's small net (width 1024, 4 blocks) instead of the 7B: a quick check of the script "
                         "(with MVB_DEVICE=cpu it runs on the CPU, where every 8-bit part reports unavailable)")
    args = ap.parse_args(argv)
    if (args.frames - 1) % 8 or args.frames < 1 or args.height % 16 or args.width % 16:
        ap.error(f"--frames {args.frames} must be 1 + 8k and --height/--width ({args.height}x{args.width}) "
                 f"multiples of 16")
    if args.steps < 1 or args.capture_heads < 1 or args.demo_steps < 1:
        ap.error("--steps, --capture_heads and --demo_steps must be >= 1")
    try:
        args.sweep_blocks = _blocks_list(args.sweep_blocks)
    except ValueError as exc:
        ap.error(f"--sweep_blocks: {exc}")
    args.sweep_steps = _ints(args.sweep_steps, "--sweep_steps")
    args.capture_blocks = _ints(args.capture_blocks, "--capture_blocks")
    args.capture_steps = _ints(args.capture_steps, "--capture_steps")
    if not torch.cuda.is_available() and os.environ.get("MVB_DEVICE") != "cpu":
        sys.exit("fidelity_end_to_end needs a CUDA GPU (MVB_DEVICE=cpu with --small: a dry run of the script)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "net": "small" if args.small else "7B"}
    t0 = time.time()
    if not args.skip_7b:
        res["7b"] = run_7b(args, out)
    if args.demo:
        res["demo"] = run_demo(args, out)
    res["seconds"] = time.time() - t0
    (out / "fidelity.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{'run':58s} {'rel err vs fp32':>16s} {'x floor':>8s}")
    for key, r in res.get("7b", {}).get("runs", {}).items():
        if "unavailable" in r:
            print(f"{key:58s} unavailable: {r['unavailable'][:60]}")
        else:
            print(f"{key:58s} {r['rel_err_vs_fp32']:16.4e} {r.get('vs_floor', 1.0 if key == 'bf16' else 0):8.2f}")
    for key, p in res.get("demo", {}).get("psnr_db_vs_bf16", {}).items():
        print(f"demo {key:53s} {p if isinstance(p, str) else f'{p:.2f} dB'}")
    print(f"wrote {out / 'fidelity.json'} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
