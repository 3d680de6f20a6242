"""Vectors of a multiply-add-permute (MAP, +-1) or FHRR (complex phasor) vector-symbolic architecture:
seeded random codebooks and factorisation problems, bind, unbind, similarity."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from pyinterp import _validation

OP = "vsa"


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(_validation.check_int(OP, "seed", seed, low=0))
    return generator


def random_codebooks(sizes: Sequence[int], dim: int, *, seed: int | None = None, phasors: bool = False,
                     dtype: torch.dtype | None = None, device=None) -> list[Tensor]:
    """One i.i.d. codebook (M_f, dim) per entry of sizes: Rademacher +-1 (float32 by default), or unit
    phasors e^{i phi} with uniform phi (complex64 by default) when phasors=True. Drawn on the CPU from
    seed, so the same seed gives the same codebooks on every device."""
    _validation.check_int(OP, "dim", dim, low=1)
    if not sizes:
        raise ValueError(f"{OP}: sizes must name at least one codebook size")
    generator = _generator(seed)
    books = []
    for f, size in enumerate(sizes):
        _validation.check_int(OP, f"sizes[{f}]", size, low=1)
        if phasors:
            phase = torch.rand(size, dim, generator=generator, dtype=torch.float64) * (2 * math.pi)
            book = torch.polar(torch.ones_like(phase), phase).to(dtype or torch.complex64)
        else:
            book = (torch.randint(0, 2, (size, dim), generator=generator) * 2 - 1).to(dtype or torch.float32)
        books.append(book.to(device))
    return books


def bind(*vectors: Tensor) -> Tensor:
    """Elementwise product (MAP and FHRR binding)."""
    if not vectors:
        raise ValueError(f"{OP}: bind needs at least one vector")
    out = vectors[0]
    for vector in vectors[1:]:
        out = out * vector
    return out


def unbind(composite: Tensor, *vectors: Tensor) -> Tensor:
    """Remove bound vectors from a composite: multiply by their inverses (a +-1 vector is its own
    inverse; a unit phasor's inverse is its conjugate)."""
    return bind(composite, *(vector.conj() if vector.is_complex() else vector for vector in vectors))


def similarity(x: Tensor, codebook: Tensor) -> Tensor:
    """Normalised similarity of x (..., D) to every codevector of codebook (M, D): Re<x, X_m> / D, in
    [-1, 1] for +-1 and unit-phasor vectors."""
    scores = x @ codebook.conj().T if codebook.is_complex() else x @ codebook.T.to(x.dtype)
    return scores.real / x.shape[-1] if scores.is_complex() else scores / x.shape[-1]


def random_problems(codebooks: Sequence[Tensor], batch: int, *, seed: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """batch composites with uniformly drawn factors: (s (batch, D) in the codebooks' dtype,
    indices (batch, F) int64), drawn on the CPU from seed."""
    _validation.check_int(OP, "batch", batch, low=0)
    generator = _generator(seed)
    indices = torch.stack([torch.randint(0, book.shape[0], (batch,), generator=generator)
                           for book in codebooks], dim=1)
    device = codebooks[0].device
    chosen = [book[indices[:, f].to(device)] for f, book in enumerate(codebooks)]
    return bind(*chosen), indices.to(device)
