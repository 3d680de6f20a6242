"""Helpers shared by the Triton kernels of several ops (a helper used by two ops lives in neither
op's file): the interpreter switch, the accumulator dtype, argument dtype checks, the rounding store."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyinterp._dispatch import triton_interpreting as interpreting  # noqa: F401  (re-exported)
from pyinterp._dtypes import FLOAT_DTYPES, accumulator_dtype


def accumulator(dtype: torch.dtype):
    """The Triton accumulator dtype for inputs of `dtype` (pyinterp/_dtypes.py's rule)."""
    return tl.float64 if accumulator_dtype(dtype) == torch.float64 else tl.float32


def check_float(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, "
                            f"got {t.dtype}")


def pow2(n: int) -> int:
    """The next power of two >= max(n, 1) (Triton block sizes)."""
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def to_out(v, OUT: tl.constexpr):
    """Cast an fp32/fp64 result to the output dtype, rounding to nearest-even for bf16.

    The Triton interpreter truncates fp32->bf16; rounding the bits by hand first makes the cast
    exact on every backend (NaN is kept as is: adding to its bits could turn it into a number)."""
    if OUT == tl.bfloat16:
        v = v.to(tl.float32)
        is_nan = v != v
        bits = tl.where(is_nan, 0, v.to(tl.int32, bitcast=True))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = tl.where(is_nan, v, bits.to(tl.float32, bitcast=True))
    return v.to(OUT)
