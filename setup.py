"""Builds mvkernels._C through CMake so that `pip install .` works with build isolation.

Build knobs (environment variables):
  MVWORLD_CUDA_ARCHS   CUDA architectures, CMake syntax (default "80;90a")
  MVWORLD_SKIP_CUDA=1  build the CPU path only
  MAX_JOBS             parallel compile jobs (default: CPU count)
  CUDACXX / CUDA_HOME  where nvcc is (default: PATH, then /usr/local/cuda/bin/nvcc)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for cand in (os.environ.get("CUDACXX"),
                 os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        skip_cuda = os.environ.get("MVWORLD_SKIP_CUDA", "0") not in ("", "0", "false", "False")
        archs = os.environ.get("MVWORLD_CUDA_ARCHS", "80;90a")
        nvcc = None if skip_cuda else find_nvcc()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMVWORLD_CUDA_ARCHS={archs}",
            f"-DMVWORLD_SKIP_CUDA={'ON' if skip_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"mvworld: building _C (CUDA compiler: {nvcc or 'none'}{' [skipped]' if skip_cuda else ''}, "
              f"archs: {archs if nvcc else '-'}, jobs: {jobs})", flush=True)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[Extension("mvkernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
