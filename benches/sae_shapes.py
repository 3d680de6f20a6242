"""The SAE benchmark shapes of sae.md and the providers both SAE benches share."""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import pytest
import torch

from pyinterp import _dispatch

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


if bench_device() == "cpu":
    # sparsify reads this once, at its import (whichever bench imports it first): its Triton decoder
    # needs a GPU.
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")


def skip_reason(provider: str, shape: str, device: str) -> str:
    if shape in PAPER_SHAPES and device != "cuda":
        return "paper shapes need a GPU"
    if provider.startswith("pyinterp-"):
        reason = _dispatch.unavailable_reason(provider.removeprefix("pyinterp-"), torch.device(device))
        if provider == "pyinterp-triton" and device == "cpu" and not reason:
            reason = "the Triton interpreter is a correctness tool, not a benchmark target"
        return reason
    peer_packages = {"sparsify": ("sparsify", "eai-sparsify"), "saelens": ("sae_lens", "sae-lens")}
    if provider in peer_packages and importlib.util.find_spec(peer_packages[provider][0]) is None:
        return f"{peer_packages[provider][1]} is not installed (optional extra: pip install '.[peers]')"
    return ""


def bench_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class SaeCase(NamedTuple):
    row: dict
    width: int
    latents: int
    k: int
    tokens: int
    dtype: torch.dtype
    device: str


def sae_case(op: str, request, record, shape: str, provider: str, direction: str) -> SaeCase:
    """The case's results row and sizes; skips (recording why) when it cannot run here."""
    option = request.config.getoption("--shapes")
    if (shape in PAPER_SHAPES and option == "small") or (shape in SMALL_SHAPES and option == "paper"):
        pytest.skip(f"--shapes={option}")
    device = bench_device()
    width, latents, k, tokens = {**SMALL_SHAPES, **PAPER_SHAPES}[shape]
    dtype = bench_dtype(device)
    row = {"op": op, "shape": shape, "N": tokens, "D": width, "M": latents, "k": k,
           "dtype": str(dtype).removeprefix("torch."), "direction": direction, "provider": provider,
           "device_kind": device}
    reason = skip_reason(provider, shape, device)
    if reason:
        record({**row, "skipped": reason})
        pytest.skip(reason)
    return SaeCase(row, width, latents, k, tokens, dtype, device)


def time_and_record(benchmark, record, case: SaeCase, step, *, rounds: int, work: float, unit: str) -> None:
    """Warm up, time `step` with pytest-benchmark (median), measure its peak memory, and record the
    row with throughput = work / time in `unit` (TFLOP/s: work in FLOPs; GB/s: work in bytes;
    tok/s: work in tokens)."""
    from harness import UNIT_SCALE, peak_memory_bytes

    step()  # warm-up (and compilation for torch-compile)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    median_ms = benchmark.stats.stats.median * 1e3
    peak = peak_memory_bytes(step, case.device)
    throughput = work / (median_ms * 1e-3) / UNIT_SCALE[unit]
    record({**case.row, "median_ms": round(median_ms, 3), "peak_mib": round(peak / 2**20, 1),
            "throughput": round(throughput, 4), "unit": unit})
    benchmark.extra_info.update(peak_mib=round(peak / 2**20, 1), throughput=round(throughput, 4), unit=unit)
