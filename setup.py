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


def _cache_entries(cache: Path) -> dict:
    """KEY -> value of a CMakeCache.txt ("KEY:TYPE=value" lines)."""
    out = {}
    for line in cache.read_text(errors="replace").splitlines():
        if line and not line.startswith(("#", "//")) and "=" in line and ":" in line.split("=", 1)[0]:
            key, value = line.split("=", 1)
            out[key.split(":", 1)[0]] = value
    return out


def clear_stale_cmake_cache(build_dir: Path, wanted: dict) -> bool:
    """Delete ``build_dir``'s CMake cache when a tool it recorded changed or is gone; returns True if it did.

    pip builds in a fresh isolated environment each time (its own cmake, ninja, pybind11), but the cache under
    build/ keeps the previous environment's paths: CMake then refuses to reconfigure ("generator does not match",
    or a CMAKE_MAKE_PROGRAM that no longer exists), so a second ``pip install .`` in the same tree failed.
    """
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return False
    old = _cache_entries(cache)
    stale = [k for k, v in wanted.items() if v is not None and old.get(k) not in (None, v)]
    stale += [k for k in ("CMAKE_MAKE_PROGRAM", "CMAKE_COMMAND", "pybind11_DIR") if old.get(k)
              and not os.path.exists(old[k])]
    if not stale:
        return False
    print(f"mvworld: CMake cache in {build_dir} is stale ({', '.join(sorted(set(stale)))} changed): reconfiguring",
          flush=True)
    cache.unlink()
    shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
    return True


def cmake_configure(build_dir: Path, args: list, cmake: str = "cmake", ninja: str | None = None) -> None:
    """``cmake -S ROOT -B build_dir args`` with the generator and its program given explicitly."""
    cmake = shutil.which(cmake) or cmake
    generator = "Ninja" if ninja else "Unix Makefiles"
    wanted = {"CMAKE_GENERATOR": generator, "CMAKE_MAKE_PROGRAM": ninja,
              "pybind11_DIR": next((a.split("=", 1)[1] for a in args if a.startswith("-Dpybind11_DIR=")), None)}
    clear_stale_cmake_cache(build_dir, wanted)
    extra = ["-G", generator] + ([f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else [])
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args, *extra], check=True)


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
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"mvworld: building _C (CUDA compiler: {nvcc or 'none'}{' [skipped]' if skip_cuda else ''}, "
              f"archs: {archs if nvcc else '-'}, jobs: {jobs})", flush=True)
        cmake_configure(build_dir, args, ninja=shutil.which("ninja"))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for cmake_configure
    setup(ext_modules=[Extension("mvkernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
