"""DALI (NVDEC) against PyAV on the same clips: same frames within codec/colour-conversion tolerance, same
dataset semantics, batches on the GPU. Needs CUDA and ``nvidia-dali-cuda*``; skipped otherwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mvmodel.data import MultiviewDataset, PyAVDecoder, build_dataloader, dali_available, layout
from mvmodel.data.synthetic import generate_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not dali_available(), reason="needs CUDA and NVIDIA DALI (pip install nvidia-dali-cuda130)"),
]

try:  # the real footage folder, when it sits beside the repository
    from test_data_real import REAL, VIEWS as REAL_VIEWS
except Exception:  # noqa: BLE001
    REAL, REAL_VIEWS = None, None


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_syn")
    info = generate_dataset(root, views=5, clips=2, frames=40, size=(240, 352), fps=10, seed=0)
    rng = np.random.default_rng(0)
    for v in info["view_keys"]:
        layout.write_embedding(layout.prefix_path(root, v), rng.standard_normal((7, 1024)))
        for c in info["clips"]:
            layout.write_embedding(layout.t5_path(root, v, c), rng.standard_normal((11, 1024)))
    return root, info


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean absolute difference and PSNR (dB) of two uint8 tensors."""
    d = a.float().cpu() - b.float().cpu()
    mse = float((d * d).mean())
    return float(d.abs().mean()), (99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))


def _check_decoders(paths, windows):
    from mvmodel.data.dali import DALIDecoder

    dali, cpu = DALIDecoder(), PyAVDecoder(threads=0)
    for idx in windows:
        g, c = dali.decode(paths, idx), cpu.decode(paths, idx)
        for p, x, y in zip(paths, g, c):
            assert x.is_cuda and x.dtype == torch.uint8 and x.shape == y.shape, (p, x.shape, y.shape)
            mad, psnr = _compare(x, y)
            print(f"{p.name} frames {idx[0]}..{idx[-1]}: mean |diff| {mad:.3f}, PSNR {psnr:.1f} dB")
            # same frames up to NVDEC vs FFmpeg YUV->RGB rounding; a one-frame shift would be far worse
            assert mad < 2.0 and psnr > 35.0, (p, idx, mad, psnr)
        shifted = dali.decode(paths[:1], [i + 1 for i in idx])[0]
        assert _compare(shifted, c[0])[0] > 1.5 * _compare(g[0], c[0])[0]


def test_dali_matches_pyav_synthetic(syn):
    root, info = syn
    paths = [layout.video_path(root, v, "clip0001") for v in info["view_keys"]]
    _check_decoders(paths, [list(range(0, 17)), list(range(21, 38, 2)), [5, 30, 12]])  # +1 stays in range


@pytest.mark.skipif(REAL is None, reason="real footage folder not found")
def test_dali_matches_pyav_real():
    _check_decoders([layout.video_path(REAL, v, "clip0000") for v in REAL_VIEWS], [list(range(8)), [1, 3, 5, 7]])


def test_dataset_and_loader_on_gpu(syn):
    root, info = syn
    kw = dict(num_frames=16, view_keys=info["view_keys"], video_size=(120, 212), start_frame_interval=8)
    ds_gpu = MultiviewDataset(root, decoder="dali", **kw)
    ds_cpu = MultiviewDataset(root, decoder="pyav", **kw)
    assert ds_gpu.samples == ds_cpu.samples
    a, b = ds_gpu[3], ds_cpu[3]
    assert a.keys() == b.keys() and a["video"].is_cuda and a["video"].shape == b["video"].shape
    assert _compare(a["video"], b["video"])[0] < 2.0
    for k in ("t5_text_embeddings", "t5_text_mask", "view_indices", "frame_indices"):
        assert torch.equal(a[k].cpu(), b[k])
    loader = build_dataloader(ds_gpu, batch_size=2, seed=0)
    order = []
    for batch in loader:
        assert batch["video"].is_cuda and batch["t5_text_embeddings"].is_cuda
        assert batch["video"].shape == (2, 3, 5 * 16, 120, 212)
        order += list(zip(batch["clip_name"], batch["start_frame"].tolist()))
    ref = build_dataloader(ds_cpu, batch_size=2, seed=0, num_workers=0)
    assert order == [(c, s) for b in ref for c, s in zip(b["clip_name"], b["start_frame"].tolist())]
