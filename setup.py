"""Build of the compiled extension ``flux._C``.

setup.py only drives CMake (as vLLM does): the source list and the compiler flags live in
CMakeLists.txt alone.  CUDA sources are built only when the installed torch is a CUDA build,
because a CUDA extension cannot link against the CPU wheel of torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # build requirement; never listed in [build-system] (it would float)

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        with_cuda = torch.version.cuda is not None and os.environ.get("FLUX_WITH_CUDA", "1") != "0"
        cfg = os.environ.get("FLUX_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFLUX_OUTPUT_DIR={out_dir}",
            f"-DFLUX_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Without a visible GPU torch cannot pick the architecture itself.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True
        )


setup(
    packages=find_packages(include=["flux", "flux.*", "flux_kernels", "flux_kernels.*"]),
    ext_modules=[CMakeExtension("flux._C")],
    cmdclass={"build_ext": CMakeBuild},
)
