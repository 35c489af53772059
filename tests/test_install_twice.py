"""A second ``pip install .`` in the same tree: pip's isolated build environment (its ninja, pybind11) is a new
temporary folder each time, while the CMake cache under build/ remembers the previous one's paths. setup.py must
reconfigure instead of failing on the vanished tools. Reproduced here without pip: configure with tools in
folder A, delete A, configure and build with tools in folder B, in the same build directory."""
from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pybind11 = pytest.importorskip("pybind11", reason="build tools come with the test extra")
if not shutil.which("cmake") or not shutil.which("ninja"):
    pytest.skip("needs cmake and ninja (test extra)", allow_module_level=True)


def _setup_module():
    spec = importlib.util.spec_from_file_location("mvworld_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() is not run
    return mod


def _build_env(folder: Path) -> tuple[str, str]:
    """A stand-in for pip's isolated environment: its own ninja launcher and pybind11 copy."""
    (folder / "bin").mkdir(parents=True)
    ninja = folder / "bin" / "ninja"
    ninja.write_text(f"#!/bin/sh\nexec {shutil.which('ninja')} \"$@\"\n")
    ninja.chmod(ninja.stat().st_mode | stat.S_IEXEC)
    pb = folder / "site-packages" / "pybind11"
    shutil.copytree(Path(pybind11.__file__).parent, pb)
    return str(ninja), str(pb / "share" / "cmake" / "pybind11")


@pytest.mark.slow  # two CMake configures and a build: out of the quick command (-m 'not slow')
def test_reconfigure_after_the_build_environment_vanished(tmp_path):
    setup = _setup_module()
    build = tmp_path / "build" / "cmake"
    out = tmp_path / "lib"

    def args(pb_dir):
        return [f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pb_dir}", "-DMVWORLD_SKIP_CUDA=ON", "-DCMAKE_BUILD_TYPE=Release"]

    ninja_a, pb_a = _build_env(tmp_path / "envA")
    setup.cmake_configure(build, args(pb_a), ninja=ninja_a)
    assert setup._cache_entries(build / "CMakeCache.txt")["CMAKE_MAKE_PROGRAM"] == ninja_a
    shutil.rmtree(tmp_path / "envA")  # pip deletes its build environment after the install

    ninja_b, pb_b = _build_env(tmp_path / "envB")
    assert setup.clear_stale_cmake_cache(build, {"CMAKE_MAKE_PROGRAM": ninja_b}) is True
    setup.cmake_configure(build, args(pb_b), ninja=ninja_b)
    cache = setup._cache_entries(build / "CMakeCache.txt")
    assert cache["CMAKE_MAKE_PROGRAM"] == ninja_b and cache["pybind11_DIR"] == pb_b
    subprocess.run(["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 1)], check=True,
                   capture_output=True)
    assert any(p.name.startswith("_C") for p in out.iterdir())
    # Same environment again: nothing is stale, the cache (and the build) stay.
    assert setup.clear_stale_cmake_cache(build, {"CMAKE_MAKE_PROGRAM": ninja_b, "pybind11_DIR": pb_b}) is False
