"""The dtype rules every backend follows: accepted dtypes, and the accumulator dtype (fp32 for every
float input but fp64, which keeps its precision so that gradcheck and convergence tests can run)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
