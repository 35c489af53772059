"""The attention of the 7B DiT per case, timed with every backend that can run it, and the table "auto" reads.

Cases (``mvmodel.networks.attention.auto_case``): self-attention over 5 views x 12,720 tokens (dense "all" and the
view-sparse "ring1"), per-view text cross-attention (5 x 512 keys); each as inference (forward under no_grad) and
training (forward + backward). What is timed is ``Attention.core`` (per-head QK-norm, RoPE and the attention
kernel, exactly what a block runs), with backends sdpa / hybrid / mvkernels / fa4 (fa4 only when
flash-attn-4 imports). Each case's backends are written fastest first into
``mvmodel/networks/attention_table.json`` under this GPU's name, with the medians. With
``mvkernels.ops.mv_attention_int8`` installed, the self-attention inference cases are also timed as "/8bit" cases
(the 8-bit kernel "int8" next to the bf16 backends): the row "auto" reads when the precision asks for 8-bit
attention; "int8" enters it only within 5% relative L2 of the bf16 result.

Run on a GPU:  pytest benches/bench_attention_choice.py -s --benchmark-json=run.json
               python benches/bench_attention_choice.py [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import cuda_time, record  # noqa: E402

from mvmodel.networks.attention import AUTO_TABLE, Attention, _can_run, _int8_op, auto_case  # noqa: E402

DIM, HEADS, DH, CTX_DIM = 4096, 32, 128, 1024
VIEWS, VIEW_TOKENS, TEXT = 5, 12_720, 512
CANDIDATES = ("mvkernels", "fa4", "hybrid", "sdpa")
INT8_TOLERANCE = 5e-2  # relative L2 of the 8-bit kernel against the first bf16 backend (bf16 ones: 2e-2)


def _inputs(self_attn: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    S = VIEWS * VIEW_TOKENS
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(1, S, HEADS, DH, **kw)
    Sk = S if self_attn else VIEWS * TEXT
    k, v = torch.randn(1, Sk, HEADS, DH, **kw), torch.randn(1, Sk, HEADS, DH, **kw)
    ang = (torch.rand(S, DH // 2, device="cuda", generator=g) * 30).repeat(1, 2) if self_attn else None
    return q, k, v, ang


def time_case(self_attn: bool, connectivity: str, training: bool, rep: int = 7,
              eight_bit: bool = False) -> dict[str, float]:
    """Median ms of ``Attention.core`` per backend that can run this case (``eight_bit``: int8 too)."""
    attn = Attention(DIM, None if self_attn else CTX_DIM, HEADS, DH, device="cuda", dtype=torch.bfloat16)
    for m in (attn.to_q[1], attn.to_k[1]):  # non-trivial norm weights
        m.weight.data.uniform_(0.5, 1.5)
    q, k, v, ang = _inputs(self_attn)
    conn = connectivity if self_attn else "self"
    grad = torch.randn_like(q)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, first = {}, None
    for name in CANDIDATES + (("int8",) if eight_bit else ()):
        with torch.set_grad_enabled(name != "int8"):  # int8 is forward-only: it serves only without autograd
            if not _can_run(name, q, self_attn, conn):
                continue
        if conn not in ("all", "self") and name in ("sdpa", "hybrid"):
            continue  # SDPA would materialise a 63,600^2 mask: not a contender for view-sparse patterns
        attn.backend = name
        with torch.no_grad():  # a backend enters the table only if it computes the same thing
            o = attn.core(q, k, v, ang, VIEWS, conn).float()
        if first is None:
            first = (name, o)
        elif (rel := ((o - first[1]).norm() / first[1].norm()).item()) > (INT8_TOLERANCE if name == "int8" else 2e-2):
            print(f"{auto_case(self_attn, conn, training)}: {name} left out: differs from {first[0]} by {rel:.2e}")
            continue

        def fwd():
            return attn.core(*leaves, ang, VIEWS, conn)

        def train():
            for t in leaves:
                t.grad = None
            fwd().backward(grad)

        try:
            if training:
                out[name] = cuda_time(train, warmup=2, rep=rep)
            else:
                with torch.no_grad():
                    out[name] = cuda_time(fwd, warmup=2, rep=rep)
        except Exception as e:  # noqa: BLE001 - a backend that fails is reported and left out of the order
            print(f"{auto_case(self_attn, conn, training)}: {name} failed: {type(e).__name__}: {e}")
    return out


CASES = [(True, "all", False), (True, "all", True), (True, "ring1", False), (True, "ring1", True),
         (False, "self", False), (False, "self", True)]
CASES_8BIT = [(True, "all", False, True), (True, "ring1", False, True)]


def measure_all() -> dict[str, dict[str, float]]:
    results = {}
    int8 = _int8_op() is not None
    for self_attn, conn, training, *eight in CASES + (CASES_8BIT if int8 else []):
        case = auto_case(self_attn, conn, training) + ("/8bit" if eight else "")
        results[case] = time_case(self_attn, conn, training, eight_bit=bool(eight))
        print(case, {k: round(v, 3) for k, v in sorted(results[case].items(), key=lambda kv: kv[1])}, flush=True)
    return results


def write_table(results: dict[str, dict[str, float]]) -> None:
    """Merge this GPU's order into the committed table (other GPUs' rows stay)."""
    table = json.loads(AUTO_TABLE.read_text()) if AUTO_TABLE.exists() else {}
    gpu = torch.cuda.get_device_name()
    table.setdefault("gpus", {})[gpu] = {c: sorted(r, key=r.get) for c, r in results.items() if r}
    table.setdefault("medians_ms", {})[gpu] = {c: {b: round(ms, 3) for b, ms in r.items()} for c, r in results.items()}
    table.setdefault("env", {})[gpu] = f"torch {torch.__version__}, {_fa4_version()}"
    AUTO_TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {AUTO_TABLE} for {gpu}")


def _fa4_version() -> str:
    try:
        from importlib.metadata import version
        return f"flash-attn-4 {version('flash-attn-4')}"
    except Exception:  # noqa: BLE001
        return "no flash-attn-4"


def test_bench_attention_choice(benchmark):
    results = measure_all()
    if os.environ.get("MVB_WRITE_TABLE", "1") == "1":
        write_table(results)
    for case, r in results.items():
        if not r:
            continue
        best = min(r, key=r.get)
        ours = min((ms for b, ms in r.items() if b in ("mvkernels", "hybrid")), default=None)
        peers = {b: ms for b, ms in r.items() if b not in ("mvkernels", "hybrid")}
        for b, ms in r.items():
            extra = {"fastest": best}
            if ours is not None and peers:
                extra["ratio_best_peer_vs_ours"] = min(peers.values()) / ours
            record(benchmark, f"{case} {b}".replace("/", "_").replace(" ", "_"), ms, tracked=b == best, **extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only; leave attention_table.json alone")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return
    results = measure_all()
    if not args.no_write:
        write_table(results)


if __name__ == "__main__":
    main()
