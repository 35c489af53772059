"""Benchmark harness: CUDA-event timing (median of many runs) recorded through pytest-benchmark.

Each benchmark times ours and the best peer in the same process and stores, in pytest-benchmark's
``extra_info``: the median milliseconds of each, derived rates (TFLOP/s, GB/s) and the ratio. ``compare.py``
reads a run's ``--benchmark-json`` file and checks the tracked medians against ``baselines/<GPU name>.json``.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (none found)")
        here = Path(__file__).resolve().parent
        for item in items:  # this hook sees the whole session: touch only benchmarks
            if here in Path(str(item.fspath)).resolve().parents:
                item.add_marker(skip)


def cuda_time(fn, warmup: int = 5, rep: int = 30, flush_l2: bool = True) -> float:
    """Median milliseconds of ``fn()`` over ``rep`` runs, timed with CUDA events after ``warmup`` runs.
    The L2 cache is flushed before each run so that inputs smaller than L2 are not timed from cache."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_name() -> str:
    return torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def record(benchmark, name: str, median_ms: float, fn=None, tracked: bool = True, **extra) -> None:
    """Store one measured figure; ``tracked`` medians are checked by the regression gate.
    With ``fn``, pytest-benchmark also times it (synchronised wall clock) for its own table."""
    info = benchmark.extra_info.setdefault("results", {})
    info[name] = {"median_ms": median_ms, "tracked": tracked, **extra}
    benchmark.extra_info["gpu"] = gpu_name()
    # pytest-benchmark writes a test to the JSON only if its fixture ran exactly once (a second call marks the test
    # as failed): time fn, or run a no-op round, unless the test or an earlier figure already used it.
    if getattr(benchmark, "_mode", None):
        return

    def synced():
        fn()
        torch.cuda.synchronize()

    if fn is not None:
        benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.fixture
def timer():
    return cuda_time
