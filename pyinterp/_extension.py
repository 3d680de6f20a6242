"""Loads the compiled modules and remembers why one is missing, for backend choice and `pyinterp info`."""
from __future__ import annotations

import importlib
from types import ModuleType

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"pyinterp.{name}")
        except ImportError as exc:  # not built, or built against another torch
            _modules[name] = None
            _errors[name] = f"pyinterp.{name} could not be imported ({exc})"
    return _modules[name]


def cpu_extension() -> ModuleType | None:
    """pyinterp._C: the C++ CPU kernels and every op schema."""
    return _load("_C")


def cuda_extension() -> ModuleType | None:
    """pyinterp._C_cuda: the CUDA kernels (a plain shared library registering into pyinterp::)."""
    if "_C_cuda" not in _modules:
        import pathlib

        import torch

        cpu_extension()  # the schemas must exist before CUDA implementations register
        import importlib.machinery

        # The build for this interpreter (a checkout may also hold another Python's build).
        folder = pathlib.Path(__file__).parent
        candidates = [folder / f"_C_cuda{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                      if (folder / f"_C_cuda{suffix}").exists()]
        if not candidates:
            _modules["_C_cuda"] = None
            _errors["_C_cuda"] = "pyinterp._C_cuda was not built (no nvcc at build time, or PYINTERP_TARGET_DEVICE=cpu|none)"
        else:
            try:
                torch.ops.load_library(str(candidates[0]))
                _modules["_C_cuda"] = ModuleType("pyinterp._C_cuda")
                _modules["_C_cuda"].__file__ = str(candidates[0])
            except OSError as exc:
                _modules["_C_cuda"] = None
                _errors["_C_cuda"] = f"{candidates[0].name} could not be loaded ({exc})"
    return _modules["_C_cuda"]


def load_error(name: str) -> str:
    return _errors.get(name, "")
