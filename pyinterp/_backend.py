"""Which backends can run an op on a device, why the others cannot, and which one `auto` picks."""
from __future__ import annotations

import functools
import os

import torch

from pyinterp import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")
# Preferred order under backend="auto", fastest first (benches/ measures the claim per device).
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return ""


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Empty string if `backend` can run on `device`, else the reason it cannot."""
    device = torch.device(device)
    if backend == "torch":
        return ""
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device.type}"
        if _extension.cpu_extension() is None:
            return _extension.load_error("_C")
        return ""
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device.type}"
        if _extension.cuda_extension() is None:
            return _extension.load_error("_C_cuda")
        return ""
    if backend == "triton":
        if _triton_import_error():
            return _triton_import_error()
        if device.type == "cpu" and not triton_interpreting():
            return "triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return ""
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"


def available_backends(device: torch.device) -> list[str]:
    return [b for b in BACKENDS if not unavailable_reason(b, device)]


def resolve(backend: str, device: torch.device, op: str) -> str:
    """Turn 'auto' (or PYINTERP_BACKEND) into a concrete backend; raise if it cannot run here."""
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a string, got {type(backend).__name__}")
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get("PYINTERP_BACKEND", "auto")
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if not unavailable_reason(candidate, device):
                return candidate
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {reason}")
    return backend
