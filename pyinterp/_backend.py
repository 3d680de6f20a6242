"""Which backends can run an op on a device, why the others cannot, and which one `auto` picks."""
from __future__ import annotations

import importlib.util
import os

import torch

from pyinterp import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")
# Preferred order under backend="auto", fastest first (benches/ measures the claim per device).
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once without importing triton (slow), and as a constant that torch.compile can trace.
_TRITON_MISSING = ("" if importlib.util.find_spec("triton") is not None
                   else "triton is not installed (pip install triton)")


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
        if _TRITON_MISSING:
            return _TRITON_MISSING
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
