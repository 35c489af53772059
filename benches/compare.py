"""Regression gate: compare a benchmark run with the stored per-GPU baseline.

    pytest benches/ --benchmark-json=run.json
    python benches/compare.py run.json            # fails (exit 1) if a tracked median is > 3% slower
    python benches/compare.py run.json --update   # store this run as the GPU's baseline
    python benches/compare.py scaling.jsonl       # the same for bench_scaling.py's rows (one per launch)

Baselines live in benches/baselines/<GPU kind>.json, keyed "<benchmark test name>::<result name>" -> median_ms.
The GPU kind is the GPU's name (e.g. NVIDIA_H100_80GB_HBM3.json) for one GPU and "<name>x<N>" for N GPUs of one
host (e.g. NVIDIA_H200x2.json); bench_scaling's rows are keyed "scaling::<experiment>::cp=<cp>::<choices>" with
the step time as median_ms, and its 1-GPU rows go into the single-GPU file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINES = Path(__file__).resolve().parent / "baselines"


def load_runs(path: Path) -> dict[str, dict[str, float]]:
    """{GPU kind: {key: median_ms}} of a pytest-benchmark JSON file or a bench_scaling JSON-lines file."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # several JSON documents: bench_scaling rows
        data = None
    if isinstance(data, dict) and "benchmarks" in data:
        gpu, medians = load_run(path)
        return {gpu: medians}
    runs: dict[str, dict[str, float]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "gpu_kind" not in row or "scaling_key" not in row:
            raise SystemExit(f"{path}:{n}: not a bench_scaling row (no gpu_kind/scaling_key); rerun the bench")
        if row["gpu_kind"] == "cpu":
            continue  # CPU smoke tests are not tracked
        runs.setdefault(row["gpu_kind"], {})[row["scaling_key"]] = 1e3 * float(row["s_per_step"])
    if not runs:
        raise SystemExit(f"{path}: no GPU results")
    return runs


def load_run(path: Path) -> tuple[str, dict[str, float]]:
    data = json.loads(path.read_text())
    gpu, medians = None, {}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        gpu = extra.get("gpu", gpu)
        for name, res in extra.get("results", {}).items():
            if res.get("tracked", True):
                medians[f"{bench['name']}::{name}"] = float(res["median_ms"])
    if gpu is None:
        raise SystemExit(f"{path}: no benchmark results with a GPU name (was it run on a GPU?)")
    return gpu, medians


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_json", type=Path)
    ap.add_argument("--update", action="store_true", help="write this run as the baseline for its GPU")
    ap.add_argument("--threshold", type=float, default=0.03, help="allowed slowdown (default 0.03 = 3%%)")
    args = ap.parse_args(argv)
    failed = 0
    for gpu, run in sorted(load_runs(args.run_json).items()):
        failed += compare(gpu, run, args.update, args.threshold)
    return 1 if failed else 0


def compare(gpu: str, run: dict[str, float], update: bool, threshold: float) -> int:
    """Compare (or store, with ``update``) one GPU kind's medians; returns 1 on a regression or missing baseline."""
    base_path = BASELINES / f"{gpu}.json"
    if update:
        old = json.loads(base_path.read_text()) if base_path.exists() else {}
        old.update(run)
        BASELINES.mkdir(exist_ok=True)
        base_path.write_text(json.dumps(dict(sorted(old.items())), indent=1) + "\n")
        print(f"baseline for {gpu}: {len(run)} medians written to {base_path}")
        return 0
    if not base_path.exists():
        print(f"no baseline for {gpu} ({base_path}); run with --update to create it")
        return 1
    base = json.loads(base_path.read_text())
    failed = 0
    print(f"{gpu}:\n{'benchmark':70s} {'base ms':>10s} {'run ms':>10s} {'change':>8s}")
    for key, ms in sorted(run.items()):
        if key not in base:
            print(f"{key:70s} {'-':>10s} {ms:10.3f}      new")
            continue
        change = ms / base[key] - 1
        bad = change > threshold
        failed += bad
        print(f"{key:70s} {base[key]:10.3f} {ms:10.3f} {change:+7.1%}{'  REGRESSION' if bad else ''}")
    scaling = next(iter(run)).startswith("scaling::")  # a scaling file shares the 1-GPU baseline with pytest's
    missing = sorted(k for k in set(base) - set(run) if k.startswith("scaling::") == scaling)
    if missing:
        print(f"not measured in this run: {', '.join(missing)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
