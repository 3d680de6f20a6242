"""Argument checks shared by every op. Each error names the op and the argument."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from pyinterp._dtypes import FLOAT_DTYPES, INDEX_DTYPES  # noqa: F401  (re-exported for the ops)


def check_tensor(op: str, name: str, value, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{op}: {name} must be {want}-D, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{op}: {name} must have dtype in ({names}), got {value.dtype}")
    return value


def check_encoder(op: str, x, W_enc, *, weight_name: str = "W_enc", **vectors) -> tuple[int, int]:
    """The inputs every SAE encoder takes: x (..., D) float, W_enc (M, D) with M, D >= 1 (named
    weight_name in errors: a tied encoder takes W_dec), and 1-D `vectors` (None: absent). Returns (M, D)."""
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, weight_name, W_enc, ndim=2)
    for name, tensor in vectors.items():
        if tensor is not None:
            check_tensor(op, name, tensor, ndim=1)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., D), got a scalar")
    num_latents, width = W_enc.shape
    if num_latents == 0 or width == 0:
        raise ValueError(f"{op}: {weight_name} must be (M, D) with M >= 1 latents and D >= 1 features, got "
                         f"shape {tuple(W_enc.shape)}")
    if x.shape[-1] != width:
        raise ValueError(f"{op}: x has {x.shape[-1]} features in its last dim but {weight_name} has "
                         f"{width} columns ({weight_name} must be (M, D) with D = x.shape[-1])")
    return num_latents, width


def check_same_device(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but {reference_name} is on "
                             f"{reference.device}; move them to one device")


def check_same_dtype(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype} but {reference_name} has "
                            f"{reference.dtype}; cast them to one dtype")


def check_shape(op: str, name: str, tensor: torch.Tensor | None, shape: tuple[int, ...],
                meaning: str = "") -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}{extra}, got {tuple(tensor.shape)}")


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None,
              meaning: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"{op}: {name} must be in {bounds}{extra}, got {value}")
    return value


def check_top_k(op: str, name: str, k, num_latents: int, latents_name: str = "the number of latents") -> int:
    """The one wording of 1 <= k <= M."""
    return check_int(op, name, k, low=1, high=num_latents, meaning=f"1 <= {name} <= {latents_name}")


def check_choice(op: str, name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_number(op: str, name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, meaning: str = "") -> float:
    """A finite real in [low, high) (or (low, high) with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{op}: {name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value >= high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"{op}: {name} must be in {bounds}{extra}, got {value}")
    return float(value)


def check_index_range(op: str, name: str, indices: torch.Tensor, size: int, size_name: str) -> None:
    """Host-syncing range check; callers whose indices come from pyinterp's own ops may skip it."""
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    if int(low) < 0 or int(high) >= size:
        raise IndexError(f"{op}: {name} must lie in [0, {size}) ({size_name}), "
                         f"found values in [{int(low)}, {int(high)}]")


def check_sparse_code(op: str, values, indices, W_dec, b_dec) -> tuple[int, int, int]:
    """A sparse code (values, indices: the same shape (..., k), float values, int32/int64 indices)
    against a decoder W_dec (M, D) and optional b_dec (D,) on one device in one dtype; returns
    (M, D, k)."""
    check_tensor(op, "values", values, dtypes=FLOAT_DTYPES)
    check_tensor(op, "indices", indices, dtypes=INDEX_DTYPES)
    check_tensor(op, "W_dec", W_dec, ndim=2)
    if b_dec is not None:
        check_tensor(op, "b_dec", b_dec, ndim=1)
    if values.dim() < 1 or indices.shape != values.shape:
        raise ValueError(f"{op}: indices must have the shape of values {tuple(values.shape)}, "
                         f"got {tuple(indices.shape)}")
    check_same_device(op, "values", values, indices=indices, W_dec=W_dec, b_dec=b_dec)
    check_same_dtype(op, "values", values, W_dec=W_dec, b_dec=b_dec)
    num_latents, width = W_dec.shape
    if num_latents == 0 or width == 0:
        raise ValueError(f"{op}: W_dec must be (M, D) with M >= 1 latents and D >= 1 features, got "
                         f"shape {tuple(W_dec.shape)}")
    check_shape(op, "b_dec", b_dec, (width,), "W_dec.shape[1]")
    k = check_int(op, "k (values.shape[-1])", values.shape[-1], low=1)
    return num_latents, width, k
