"""Builds the native modules with CMake + Ninja; metadata lives in pyproject.toml.

    pip install -e . --no-build-isolation    # development (in place, incremental)
    pip install .                            # isolated build into site-packages

Environment knobs:
    DFASTLLM_CPU_ONLY=1        skip the CUDA kernels even when nvcc is found
    DFASTLLM_CUDA_ARCHS="80;90" CUDA architectures (default "80;90")
    DFASTLLM_CPU_ARCH=native   -march for the CPU kernels (default native: this
                               machine's AVX-512/AVX2). Wheels that travel:
                               x86-64-v3 (AVX2); empty: compiler default
    MAX_JOBS=N                 parallel compile jobs (default: ninja's choice)
    DFASTLLM_BUILD_TYPE=Debug  CMake build type (default Release)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """A module that CMakeLists.txt builds; setuptools only places it."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _tool(module: str, program: str) -> str:
    """The pip-installed tool when its package is importable (build isolation
    puts it there), else the one on PATH."""
    try:
        mod = __import__(module)
        candidate = Path(mod.BIN_DIR) / program
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(program)
    if not found:
        raise RuntimeError(f"{program} not found: pip install {module}")
    return found


def _drop_foreign_cache(build_dir: Path) -> None:
    """A build folder copied from another checkout (a Docker COPY, a moved
    tree) makes CMake refuse to configure; start that one afresh."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
            if Path(line.split("=", 1)[1]).resolve() != ROOT:
                shutil.rmtree(build_dir)
            return


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        import pybind11

        # One CMake project builds every module straight into the package dir
        # setuptools expects (the source tree for editable installs).
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        # A fixed folder in the tree keeps rebuilds incremental (editable
        # installs would otherwise configure from scratch in a temp folder).
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        _drop_foreign_cache(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "cmake")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'ninja')}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('DFASTLLM_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDFASTLLM_CPU_ONLY={'ON' if _flag('DFASTLLM_CPU_ONLY') else 'OFF'}",
            f"-DDFASTLLM_CPU_ARCH={os.environ.get('DFASTLLM_CPU_ARCH', 'native')}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('DFASTLLM_CUDA_ARCHS', '80;90')}",
        ]
        build = [cmake, "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(configure, check=True)
        subprocess.run(build, check=True)
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name)).resolve()
            if not built.exists():
                raise RuntimeError(f"CMake did not produce {built}")


setup(ext_modules=[CMakeExtension("dfastllm._C"), CMakeExtension("dfastllm._ipc")],
      cmdclass={"build_ext": CMakeBuild})
