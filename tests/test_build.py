"""The installed extension says what it was built with."""
import os
import shutil

import pytest

import mvkernels


def test_build_info_keys():
    info = mvkernels.build_info()
    assert info["cpu"] is True
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert (info["cuda_version"] is None) == (not info["cuda_archs"])


@pytest.mark.skipif(not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")),
                    reason="no CUDA compiler on this machine")
def test_cuda_kernels_were_compiled_when_nvcc_exists():
    # CI has nvcc: the CUDA kernels must have been built (for sm_80 and sm_90a unless overridden).
    info = mvkernels.build_info()
    assert info["cuda_archs"], "nvcc exists but the extension was built without CUDA kernels"
