"""The regression gate (benches/compare.py) on bench_scaling rows: per-GPU-kind baseline files next to the
single-GPU ones, 3% threshold."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _compare(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_compare", REPO / "benches" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "BASELINES", tmp_path / "baselines")
    return mod


def _rows(path: Path, s1: float, s2: float) -> Path:
    key = "scaling::text2world_multiview_7b_example_waymo::cp={}::ac=selective"
    rows = [dict(gpu_kind="NVIDIA_H200", scaling_key=key.format(1), s_per_step=s1),
            dict(gpu_kind="NVIDIA_H200x2", scaling_key=key.format(2), s_per_step=s2),
            dict(gpu_kind="cpu", scaling_key=key.format(2), s_per_step=99.0)]  # CPU smoke rows are not tracked
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scaling_rows_are_tracked_per_gpu_kind(tmp_path, monkeypatch, capsys):
    cmp = _compare(tmp_path, monkeypatch)
    run = _rows(tmp_path / "base.jsonl", 16.0, 11.0)
    assert cmp.main([str(run)]) == 1  # no baseline yet
    assert cmp.main([str(run), "--update"]) == 0
    files = sorted(p.name for p in (tmp_path / "baselines").iterdir())
    assert files == ["NVIDIA_H200.json", "NVIDIA_H200x2.json"]
    assert list(json.loads((tmp_path / "baselines" / "NVIDIA_H200x2.json").read_text()).values()) == [11000.0]
    assert cmp.main([str(_rows(tmp_path / "ok.jsonl", 16.4, 11.3))]) == 0  # +2.5%, +2.7%: within 3%
    capsys.readouterr()
    assert cmp.main([str(_rows(tmp_path / "slow.jsonl", 16.0, 11.4))]) == 1  # 2 GPUs +3.6%
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "NVIDIA_H200x2" in out
