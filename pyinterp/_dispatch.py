"""The dispatch core every op goes through (docs/ARCHITECTURE.md, "The spine").

An op declares one `OpSpec` in pyinterp/ops/<op>.py: its kernels per backend (loaded on first use), its
preference order per device under backend="auto", and optionally a per-request predicate that says why a
backend cannot run a particular call. `OpSpec.resolve` turns "auto" (or PYINTERP_BACKEND) into a backend
that can run the call, or raises naming the op and the reason. The `torch` backend is every op's
reference (pyinterp/reference/<op>.py): always available, differentiated by torch's own autograd."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any, Callable, Mapping

import torch

from pyinterp import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")
BACKEND_ENV = "PYINTERP_BACKEND"
# Preferred order under backend="auto", fastest first (benches/ measures the claim per device).
DEFAULT_AUTO_ORDER: Mapping[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"),
                                                     "cpu": ("cpu", "torch")}

# Looked up once without importing triton (slow), and as a constant that torch.compile can trace.
_TRITON_MISSING = ("" if importlib.util.find_spec("triton") is not None
                   else "triton is not installed (pip install triton)")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_kernels(op: str) -> ModuleType:
    """The Triton launcher module of `op`, imported on first use: the interpreter mode must be set
    before @triton.jit runs, and importing triton is slow."""
    return importlib.import_module(f"pyinterp._kernels.triton.{op}")


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Empty string if `backend` can run on `device` at all, else the reason it cannot."""
    device = torch.device(device)
    if backend == "torch":
        return ""
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device.type}"
        return "" if _extension.cpu_extension() is not None else _extension.load_error("_C")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device.type}"
        return "" if _extension.cuda_extension() is not None else _extension.load_error("_C_cuda")
    if backend == "triton":
        if _TRITON_MISSING:
            return _TRITON_MISSING
        if device.type == "cpu" and not triton_interpreting():
            return "triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return ""
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """name: the op. kernels: backend -> a function returning that backend's kernel(s), called on
    first use (an op whose torch backend is its differentiable reference needs no "torch" entry). auto_order: device type -> preference order.
    supports(backend, **request) -> "" or why `backend` cannot run this request (naming the argument)."""
    name: str
    kernels: Mapping[str, Callable[[], Any]]
    auto_order: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: DEFAULT_AUTO_ORDER)
    supports: Callable[..., str] | None = None

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b == "torch" or b in self.kernels)

    def why_not(self, backend: str, device: torch.device, **request) -> str:
        """Empty string if `backend` can run this request on `device`, else the reason."""
        reason = unavailable_reason(backend, device)
        if not reason and backend not in self.backends:
            reason = f"{self.name} has no {backend} backend (it has {', '.join(self.backends)})"
        return reason

    def unsupported(self, backend: str, **request) -> str:
        return self.supports(backend, **request) if self.supports is not None and request else ""

    def resolve(self, backend: str, device: torch.device, **request) -> str:
        """Turn 'auto' (or PYINTERP_BACKEND) into a backend that runs this request; raise if the
        chosen one cannot (RuntimeError: not available here; ValueError: not for these arguments)."""
        if not isinstance(backend, str):
            raise TypeError(f"{self.name}: backend must be a string, got {type(backend).__name__}")
        device = torch.device(device)
        if backend == "auto":
            backend = os.environ.get(BACKEND_ENV, "auto")
        if backend == "auto":
            reasons = []
            for candidate in self.auto_order.get(device.type, ("torch",)):
                why = self.why_not(candidate, device) or self.unsupported(candidate, **request)
                if not why:
                    return candidate
                reasons.append(f"{candidate}: {why}")
            raise RuntimeError(f"{self.name}: no backend runs this call: " + "; ".join(reasons))
        reason = self.why_not(backend, device)
        if reason:
            raise RuntimeError(f"{self.name}: backend={backend!r} is not available: {reason}")
        why = self.unsupported(backend, **request)
        if why:
            raise ValueError(f"{self.name}: {why}")
        return backend

    def kernel(self, backend: str) -> Any:
        """The kernel(s) of a resolved backend."""
        return self.kernels[backend]()

    def available(self, device: torch.device) -> list[str]:
        """This op's backends that can run on `device` here."""
        return [b for b in self.backends if not self.why_not(b, device)]


_SPECS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in _SPECS:
        raise RuntimeError(f"op {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def op_spec(name: str) -> OpSpec:
    import pyinterp.ops  # noqa: F401  (registers every op)

    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; ops: {', '.join(sorted(_SPECS))}") from None


def op_names() -> list[str]:
    import pyinterp.ops  # noqa: F401

    return sorted(_SPECS)


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on `device` here (each op may have fewer: OpSpec.available)."""
    return [b for b in BACKENDS if not unavailable_reason(b, device)]
