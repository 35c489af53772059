import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # A test parametrised on the CUDA device is a GPU test too: `pytest -m gpu` on a GPU machine runs exactly the
    # tests that CI (no GPU) skips.
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and any(str(v) in ("cuda", "cuda:0") for v in spec.params.values()):
            item.add_marker(pytest.mark.gpu)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def backend(monkeypatch):
    """Force MVKERNELS_BACKEND for one test: ``backend("csrc")``."""
    def _set(name: str):
        monkeypatch.setenv("MVKERNELS_BACKEND", name)
    return _set


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


os.environ.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
