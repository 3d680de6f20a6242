"""Builds pyinterp: setuptools drives CMake + Ninja (see CMakeLists.txt).

Environment:
  PYINTERP_TARGET_DEVICE  auto (default) | cpu | cuda | none
                          auto: _C always, _C_cuda when nvcc is found; cpu: _C only;
                          cuda: _C and _C_cuda (fails without nvcc); none: pure Python (Triton + torch).
  PYINTERP_CUDA_ARCHS     CUDA architectures, default "90a" (e.g. "90a;100a").
  PYINTERP_BUILD_DIR      CMake build folder (default build/cmake).
  MAX_JOBS                parallel compile jobs (default: number of cores).
  NVCC_THREADS            threads nvcc uses per job (default 1).
Build without isolation so the installed torch is used: pip install --no-build-isolation .
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
TARGET_DEVICE = os.environ.get("PYINTERP_TARGET_DEVICE", "auto").lower()
if TARGET_DEVICE not in ("auto", "cpu", "cuda", "none"):
    sys.exit(f"PYINTERP_TARGET_DEVICE must be auto, cpu, cuda or none, not {TARGET_DEVICE!r}")


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def has_cuda_sources() -> bool:
    return any((ROOT / "kernels" / "cuda").glob("*.cu"))


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11
        import torch
        import torch.utils.cpp_extension as cpp_extension

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A fixed build folder keeps rebuilds incremental (pip's own temp folder is new every time).
        build_dir = Path(os.environ.get("PYINTERP_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        build_cuda = {"auto": "auto", "cuda": "ON"}.get(TARGET_DEVICE, "OFF")
        nvcc_threads = os.environ.get("NVCC_THREADS", "1")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={cpp_extension.library_paths()[0]}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPYINTERP_BUILD_CUDA={build_cuda}",
            f"-DPYINTERP_CUDA_ARCHS={os.environ.get('PYINTERP_CUDA_ARCHS', '90a')}",
            f"-DCMAKE_CUDA_FLAGS=--threads={nvcc_threads}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G", "Ninja",
        ]
        if Path("/usr/local/cuda/bin/nvcc").exists() and not shutil.which("nvcc"):
            args.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--target", ext.target, "-j", jobs],
                       cwd=build_dir, check=True)
        # _C_cuda is a plain library (stable ABI, no Python init) named _C_cuda.so; setuptools copies
        # the file it expects at the extension's full path.
        plain = out_dir / f"{ext.target}.so"
        if plain.exists():
            plain.replace(self.get_ext_fullpath(ext.name))


def extensions() -> list:
    if TARGET_DEVICE == "none":
        return []
    exts = [CMakeExtension("pyinterp._C", "_C")]
    if has_cuda_sources() and (TARGET_DEVICE == "cuda" or (TARGET_DEVICE == "auto" and nvcc_available())):
        exts.append(CMakeExtension("pyinterp._C_cuda", "_C_cuda"))
    return exts


setup(
    packages=find_packages(include=["pyinterp", "pyinterp.*"]) + ["pyinterp._kernels",
                                                                  "pyinterp._kernels.triton"],
    package_dir={"pyinterp._kernels": "kernels"},
    package_data={"pyinterp._kernels": ["cuda/*.cuh", "cuda/*.cu"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
