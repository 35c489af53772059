"""Training-loader throughput: DALI (NVDEC) vs PyAV with N worker processes, in one process.

Workload (the Waymo post-training sample): 5 views x 57 frames stretched to 480x848 from 1920x1280 10-fps
H.264 sources (synthetic, generated once into ``$MVWORLD_BENCH_DATA`` or a temp folder). Each loader yields
batches of 1 sample; PyAV batches are copied to the GPU as training would. Reported per configuration:
samples/s, frames/s, CPU cores used (process + workers CPU time / wall time) and GPU memory used.
Target (issue 4): DALI >= 2 samples/s per GPU with <= 2 CPU cores.

    pytest benches/bench_data.py -s --benchmark-json=run.json       (GPU; skipped without one)
    python benches/bench_data.py [--workers 4 8 14] [--batches 12] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from mvmodel.data import MultiviewDataset, build_dataloader, dali_available
from mvmodel.data.synthetic import generate_dataset

VIEWS, FRAMES, SIZE, SRC = 5, 57, (480, 848), (1280, 1920)


def sources(quick: bool = False) -> Path:
    """The benchmark clips (cached): 2 clips x 80 frames per view at 1920x1280 (quick: 2 x 64 at 320x480)."""
    base = Path(os.environ.get("MVWORLD_BENCH_DATA", Path(tempfile.gettempdir()) / "mvworld_bench_data"))
    src = SRC if not quick else (320, 480)
    root = base / f"{src[0]}x{src[1]}"
    if not (root / "DONE").exists():
        t0 = time.perf_counter()
        generate_dataset(root, views=VIEWS, clips=2, frames=80 if not quick else 64, size=src, fps=10, seed=0,
                         workers=min(10, os.cpu_count() or 1))
        (root / "DONE").write_text(f"{time.perf_counter() - t0:.1f} s\n")
    return root


class CpuMeter:
    """CPU seconds of this process and all its children (workers), sampled while they live."""

    def __init__(self):
        import psutil  # noqa: PLC0415

        self.proc, self.seen, self._stop = psutil.Process(), {}, threading.Event()

    def _sample(self):
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                t = p.cpu_times()
                self.seen[p.pid] = t.user + t.system
            except Exception:  # noqa: BLE001 - a worker may exit between listing and reading
                pass

    def __enter__(self):
        self._sample()
        self.start = dict(self.seen)
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def restart(self):
        self._sample()
        self.start, self.t0 = dict(self.seen), time.perf_counter()

    def _run(self):
        while not self._stop.wait(0.1):
            self._sample()

    def __exit__(self, *exc):
        self._sample()
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self.t0
        self.cpu = sum(v - self.start.get(pid, 0.0) for pid, v in self.seen.items())
        self.cores = self.cpu / self.wall


def measure(decoder: str, workers: int, batches: int = 12, warmup: int = 2, quick: bool = False) -> dict:
    root = sources(quick)
    size = SIZE if not quick else (240, 424)
    ds = MultiviewDataset(root, FRAMES, None, size, decoder=decoder, load_t5=False,
                          decoder_kwargs={"threads": 1} if decoder == "pyav" else {})
    cuda = torch.cuda.is_available()
    loader = build_dataloader(ds, 1, seed=0, num_workers=workers, persistent_workers=workers > 0,
                              prefetch_factor=2)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        free0 = torch.cuda.mem_get_info()[0]
    it = iter(loader)
    min_free = None
    with CpuMeter() as meter:
        for k in range(warmup + batches):
            if k == warmup:  # time steady state only: worker start-up and DALI pipeline build are excluded
                meter.restart()
            b = next(it)
            if cuda:
                b["video"] = b["video"].to("cuda", non_blocking=True)
                torch.cuda.synchronize()
                free = torch.cuda.mem_get_info()[0]
                min_free = free if min_free is None else min(min_free, free)
    del it, loader
    sps = batches / meter.wall
    return {"decoder": decoder, "workers": workers, "samples_per_s": sps, "frames_per_s": sps * VIEWS * FRAMES,
            "cpu_cores": meter.cores, "gpu_mem_gb": ((free0 - min_free) / 2**30) if cuda else 0.0,
            "torch_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "gpu": torch.cuda.get_device_name() if cuda else "cpu"}


CONFIGS = [("dali", 0), ("pyav", 4), ("pyav", 8), ("pyav", 14)]
_RESULTS: dict[str, dict] = {}


@pytest.mark.parametrize("decoder,workers", CONFIGS, ids=[f"{d}-{w}w" for d, w in CONFIGS])
def test_loader_throughput(benchmark, decoder, workers):
    pytest.importorskip("psutil")
    if decoder == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")
    r = measure(decoder, workers)
    _RESULTS[f"{decoder}-{workers}w"] = r
    pyav = [v for k, v in _RESULTS.items() if k.startswith("pyav")]
    best = max((v["samples_per_s"] for v in pyav), default=None)
    try:
        from conftest import record  # benches/conftest.py
    except ImportError:
        record = None
    extra = dict(r, ratio_to_best_pyav=(r["samples_per_s"] / best) if best else None)
    if record is not None:
        record(benchmark, f"loader_{decoder}_{workers}w", 1000.0 / r["samples_per_s"], tracked=False, **extra)
    else:
        benchmark.extra_info.update(extra)
    print(json.dumps(extra))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8, 14])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="small sources, for a CPU smoke run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    rows = []
    if dali_available():
        rows.append(measure("dali", 0, a.batches, quick=a.quick))
    for w in a.workers:
        rows.append(measure("pyav", w, a.batches, quick=a.quick))
    best = max(r["samples_per_s"] for r in rows if r["decoder"] == "pyav")
    print(f"{'loader':>10} {'samples/s':>10} {'frames/s':>9} {'CPU cores':>9} {'GPU GB':>7} {'vs best PyAV':>12}")
    for r in rows:
        r["ratio_to_best_pyav"] = r["samples_per_s"] / best
        print(f"{r['decoder'] + '-' + str(r['workers']) + 'w':>10} {r['samples_per_s']:10.2f} "
              f"{r['frames_per_s']:9.0f} {r['cpu_cores']:9.2f} {r['gpu_mem_gb']:7.2f} {r['ratio_to_best_pyav']:12.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
