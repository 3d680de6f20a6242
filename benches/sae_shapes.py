"""The SAE benchmark shapes of sae.md and the providers both SAE benches share."""
from __future__ import annotations

import importlib.util
import os

import torch

from pyinterp import _backend

# name: (D, M, k, N)
SMALL_SHAPES = {"cpu-small": (384, 16384, 32, 4096)}
PAPER_SHAPES = {
    "gpt2-32k": (768, 32768, 32, 16384),
    "gemma2b-64k": (2304, 65536, 64, 8192),
    "llama8b-128k-k32": (4096, 131072, 32, 8192),
    "llama8b-128k-k192": (4096, 131072, 192, 8192),
    "wide-1m": (4096, 1048576, 64, 4096),
}
DIRECTIONS = ("forward", "forward+backward")


def bench_device() -> str:
    """PYINTERP_BENCH_DEVICE (set by `pyinterp bench --device`), else the GPU when there is one."""
    return os.environ.get("PYINTERP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def skip_reason(provider: str, shape: str, device: str) -> str:
    if shape in PAPER_SHAPES and device != "cuda":
        return "paper shapes need a GPU"
    if provider.startswith("pyinterp-"):
        reason = _backend.unavailable_reason(provider.removeprefix("pyinterp-"), torch.device(device))
        if provider == "pyinterp-triton" and device == "cpu" and not reason:
            reason = "the Triton interpreter is a correctness tool, not a benchmark target"
        return reason
    if provider == "sparsify" and importlib.util.find_spec("sparsify") is None:
        return "eai-sparsify is not installed (optional extra: pip install '.[peers]')"
    return ""


def bench_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
