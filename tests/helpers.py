"""Shared test helpers: backends to test, exact SAE data, and dtype-aware tolerances."""
from __future__ import annotations

import torch

from pyinterp import _dispatch

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backends(op: str, device: str = "cpu", *, reference: bool = True) -> list[str]:
    """The backends of `op` that can run on `device` here (from the dispatch core's op spec); without
    the torch reference when reference=False. The one place tests ask which backends exist."""
    available = _dispatch.op_spec(op).available(torch.device(device))
    return [b for b in available if reference or b != "torch"]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs(op: str) -> list[tuple[str, str]]:
    """(kernel backend, device) pairs of `op` to test against its reference."""
    return [(b, d) for d in devices() for b in backends(op, d, reference=False)]


def exact_sae_data(n: int, d: int, m: int, *, seed: int = 0, dtype=torch.float32, device="cpu",
                   b_enc: bool = True, b_dec: bool = True):
    """Small integers and quarters: every pre-activation is exact in fp32 (and so every backend
    must agree bit for bit, ties included: they are common at this granularity)."""
    g = torch.Generator().manual_seed(seed)

    def ints(low, high, *shape):
        return torch.randint(low, high + 1, shape, generator=g).to(torch.float64)

    tensors = {
        "x": ints(-2, 2, n, d),
        "W_enc": ints(-2, 2, m, d) / 4,
        "b_enc": ints(-4, 4, m) / 4 if b_enc else None,
        "b_dec": ints(-2, 2, d) if b_dec else None,
    }
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in tensors.items()}


def exact_like(shape, *, seed: int, dtype=torch.float32, device="cpu", scale: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, shape, generator=g).to(torch.float64) * scale).to(device=device, dtype=dtype)


def assert_close_to_float64(actual, reference_lowp, reference64, name: str):
    """FlashAttention-style rule: a low-precision result may err at most ~2x what the reference
    itself errs in that dtype (plus one ulp at the result's scale: the Triton interpreter truncates
    fp32 -> bf16 casts)."""
    assert actual.shape == reference64.shape, f"{name}: shape {actual.shape} != {reference64.shape}"
    assert actual.dtype == reference_lowp.dtype, f"{name}: dtype {actual.dtype} != {reference_lowp.dtype}"
    error = (actual.double() - reference64.double()).abs().max().item()
    reference_error = (reference_lowp.double() - reference64.double()).abs().max().item()
    ulp = torch.finfo(actual.dtype).eps * max(reference64.abs().max().item(), 1.0)
    limit = 2 * reference_error + ulp
    assert error <= limit, f"{name}: max error {error:.3g} > {limit:.3g} (reference errs {reference_error:.3g})"
