"""Regression gate: compare a benchmark run with the stored per-GPU baseline.

    pytest benches/ --benchmark-json=run.json
    python benches/compare.py run.json            # fails (exit 1) if a tracked median is > 5% slower
    python benches/compare.py run.json --update   # store this run as the GPU's baseline

Baselines live in benches/baselines/<GPU name>.json (e.g. NVIDIA_H100_80GB_HBM3.json), keyed
"<benchmark test name>::<result name>" -> median_ms.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINES = Path(__file__).resolve().parent / "baselines"


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
    ap.add_argument("--threshold", type=float, default=0.05, help="allowed slowdown (default 0.05 = 5%%)")
    args = ap.parse_args(argv)
    gpu, run = load_run(args.run_json)
    base_path = BASELINES / f"{gpu}.json"
    if args.update:
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
    print(f"{'benchmark':70s} {'base ms':>10s} {'run ms':>10s} {'change':>8s}")
    for key, ms in sorted(run.items()):
        if key not in base:
            print(f"{key:70s} {'-':>10s} {ms:10.3f}      new")
            continue
        change = ms / base[key] - 1
        bad = change > args.threshold
        failed += bad
        print(f"{key:70s} {base[key]:10.3f} {ms:10.3f} {change:+7.1%}{'  REGRESSION' if bad else ''}")
    missing = sorted(set(base) - set(run))
    if missing:
        print(f"not measured in this run: {', '.join(missing)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
