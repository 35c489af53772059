import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
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
