"""resonator: batched resonator-network search (the rules are in pyinterp/reference/resonator.py).

Backends and what each runs (anything else raises, naming the argument, unless backend="auto", which
takes the first backend in the device's preference order that runs the request):
  cpu     C++ (csrc/cpu/resonator.cpp), arithmetic="bits": +-1 vectors, weights="op", the sign
          activations (identity, threshold, topk), noise, cycles, asymmetric codebooks, known factors.
  cuda    the same variants as cpu (kernels/cuda/resonator.cu): a persistent kernel.
  triton  arithmetic="float" (fp32, exact while max M_f * D < 2^24): +-1 vectors, weights="op",
          the sign activations, no noise, no cycle detection.
  torch   the reference (float64 / complex128): everything, FHRR phasors and non-+-1 s included.
The kernels reproduce the reference trajectory exactly: same indices, iterations, converged flags.
Outputs are integers and flags, so no op here has a gradient."""
from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from pyinterp import _dispatch, _extension, _validation
from pyinterp.reference import resonator as reference
from pyinterp.reference.resonator import ResonatorResult

OP = "resonator"
UPDATES = ("sequential", "parallel")
WEIGHTS = ("op", "ols")
STOPS = ("fixed_point", "similarity")
ARITHMETICS = ("auto", "float", "bits")
# The kernel backends' arithmetic; the torch reference computes exactly in float64.
BACKEND_ARITHMETIC = {"cpu": "bits", "cuda": "bits", "triton": "float", "torch": "float"}
FLOAT_PATH_LIMIT = 1 << 24  # fp32 holds every integer below this exactly
TRITON_MAX_CODEBOOK = 4096  # the Triton kernel keeps one codebook's similarities in registers


if _extension.cpu_extension() is not None:  # defines the pyinterp:: schemas (absent in a pure-Python build)
    @torch.library.register_fake("pyinterp::resonator_bits")
    def _resonator_bits_fake(s, similarity_codebooks, projection_codebooks, sizes, known, max_iters,
                             parallel, activation, k, threshold_units, noise, seed, stop, theta_units,
                             detect_cycles):
        return _empty_outputs(s, len(sizes))


def _empty_outputs(s: Tensor, factors: int) -> tuple[Tensor, ...]:
    batch = s.shape[0]
    return (s.new_empty((batch, factors), dtype=torch.int32), s.new_empty((batch,), dtype=torch.int32),
            s.new_empty((batch,), dtype=torch.bool), s.new_empty((batch,), dtype=torch.int32),
            s.new_empty((batch, factors), dtype=torch.float32))


@torch.library.custom_op("pyinterp::resonator_float_triton", mutates_args=())
def resonator_float_triton(s: Tensor, similarity_codebooks: Tensor, projection_codebooks: Tensor,
                           sizes: list[int], known: Optional[Tensor], max_iters: int, parallel: bool,
                           activation: str, k: int, threshold_units: int, stop: str,
                           theta_units: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _dispatch.triton_kernels("resonator").resonator_float(s, similarity_codebooks, projection_codebooks, sizes, known,
                                   max_iters, parallel, activation, k, threshold_units, stop,
                                   theta_units)


@resonator_float_triton.register_fake
def _resonator_float_triton_fake(s, similarity_codebooks, projection_codebooks, sizes, known,
                                 max_iters, parallel, activation, k, threshold_units, stop,
                                 theta_units):
    return _empty_outputs(s, len(sizes))


def _codebook_list(codebooks, s: Tensor) -> list[Tensor]:
    if isinstance(codebooks, Tensor):
        _validation.check_tensor(OP, "codebooks", codebooks, ndim=3)
        codebooks = list(codebooks.unbind(0))
    elif not isinstance(codebooks, (list, tuple)) or not codebooks:
        raise TypeError(f"{OP}: codebooks must be a non-empty list of (M_f, D) tensors or one "
                        f"(F, M, D) tensor, got {type(codebooks).__name__}")
    dim = s.shape[-1]
    for f, codebook in enumerate(codebooks):
        name = f"codebooks[{f}]"
        _validation.check_tensor(OP, name, codebook, ndim=2)
        _validation.check_same_device(OP, "s", s, **{name: codebook})
        if codebook.is_complex() != s.is_complex():
            kind = "complex (FHRR)" if s.is_complex() else "real"
            raise TypeError(f"{OP}: {name} has dtype {codebook.dtype} but s is {kind}; "
                            "use one kind of vector for both")
        if codebook.shape[1] != dim:
            raise ValueError(f"{OP}: {name} has width {codebook.shape[1]} but s has D = {dim}; every "
                             "codevector must have s's dimension")
        if codebook.shape[0] == 0:
            raise ValueError(f"{OP}: {name} is empty (M_f = 0); every factor needs a codevector")
    return list(codebooks)


def _is_bipolar(*tensors: Tensor) -> bool:
    return all(not t.is_complex() and bool((t.abs() == 1).all()) for t in tensors)


class _CodebookFacts:
    """What the calls learn about one list of codebooks: whether it is +-1 and its concatenation per
    kernel dtype. Kept while the same tensors stay unmodified (same _version counters), so repeated
    calls with the same codebooks (a capacity sweep, a stream of batches) skip those passes."""
    _recent: dict = {}

    def __init__(self, books: list[Tensor]):
        self.references = [weakref.ref(book) for book in books]
        self.versions = [book._version for book in books]
        self._bipolar: bool | None = None
        self._concatenated: dict[torch.dtype, Tensor] = {}

    @classmethod
    def of(cls, books: list[Tensor]) -> "_CodebookFacts":
        key = tuple(id(book) for book in books)
        facts = cls._recent.get(key)
        if facts is None or any(ref() is not book or version != book._version for ref, version, book
                                in zip(facts.references, facts.versions, books)):
            facts = cls(books)
            if len(cls._recent) >= 8:
                cls._recent.pop(next(iter(cls._recent)))
            cls._recent[key] = facts
        return facts

    def bipolar(self, books: list[Tensor]) -> bool:
        if self._bipolar is None:
            self._bipolar = _is_bipolar(*books)
        return self._bipolar

    def concatenated(self, books: list[Tensor], dtype: torch.dtype) -> Tensor:
        if dtype not in self._concatenated:
            self._concatenated[dtype] = torch.cat([book.to(dtype) for book in books]).contiguous()
        return self._concatenated[dtype]


def _unsupported(backend: str, *, arithmetic: str, bipolar: bool, phasors: bool, weights: str,
                 activation: str, noise: float, detect_cycles: int, largest: int, dim: int) -> str:
    """Why `backend` cannot run this request (naming the argument), or ''."""
    wanted = BACKEND_ARITHMETIC[backend]
    if arithmetic != "auto" and arithmetic != wanted:
        runs = [b for b, a in BACKEND_ARITHMETIC.items() if a == arithmetic and b != "torch"]
        return (f"arithmetic={arithmetic!r} is not what backend={backend!r} computes "
                f"({wanted!r}); arithmetic={arithmetic!r} runs on backend {' or '.join(map(repr, runs))}")
    if backend == "torch":
        return ""
    if phasors:
        return f"complex (FHRR) vectors run on backend='torch' only, not backend={backend!r}"
    if not bipolar:
        return (f"backend={backend!r} needs +-1 (bipolar) s and codebooks; these hold other values "
                "(use backend='torch' for real-valued vectors)")
    if weights != "op":
        return f"weights={weights!r} runs on backend='torch' only; backend={backend!r} runs weights='op'"
    if activation not in reference.SIGN_ACTIVATIONS:
        return f"activation={activation!r} runs on backend='torch' only, not backend={backend!r}"
    if backend == "triton":
        if noise > 0:
            return "noise > 0 runs on backends 'cpu', 'cuda' and 'torch', not backend='triton'"
        if detect_cycles:
            return "detect_cycles runs on backends 'cpu', 'cuda' and 'torch', not backend='triton'"
        if largest * dim >= FLOAT_PATH_LIMIT:
            return ("arithmetic='float' (fp32) is exact only while max M_f * D < 2^24; this request "
                    "exceeds it (use arithmetic='bits' or backend='torch')")
        if largest > TRITON_MAX_CODEBOOK:
            return f"backend='triton' takes codebooks of at most {TRITON_MAX_CODEBOOK} codevectors"
    return ""


SPEC = _dispatch.register(_dispatch.OpSpec(OP, kernels={
    "cuda": lambda: torch.ops.pyinterp.resonator_bits,
    "triton": lambda: resonator_float_triton,
    "cpu": lambda: torch.ops.pyinterp.resonator_bits,
}, supports=_unsupported))


def resonator(s: Tensor, codebooks, *, max_iters: int, update: str = "sequential",
              weights: str = "op", activation: str = "identity", beta: float | None = None,
              threshold: float | None = None, k: int | None = None, noise: float = 0.0,
              seed: int | None = None, stop: str = "fixed_point", theta: float | None = None,
              detect_cycles: int = 0, known: Tensor | None = None, asymmetry: float = 0.0,
              arithmetic: str = "auto", backend: str = "auto") -> ResonatorResult:
    """Factor each composite s[b] = X_1[i_1] * ... * X_F[i_F] with a resonator network.

    s: (..., D) composites, +-1 (any real or int8 dtype) or complex unit phasors (FHRR).
    codebooks: F tensors (M_f, D) (ragged M_f allowed) or one (F, M, D) tensor.
    max_iters: sweeps at most. update: "sequential" (freshest estimates, the default) | "parallel".
    weights: "op" (outer product) | "ols" (X^T (X X^T)^-1, the inverse computed once).
    activation between the two products: "identity" | "threshold" (similarities below
    threshold * D zeroed) | "topk" (the k largest kept) | "attention" (softmax(beta * a / D)).
    noise: sigma of the noise added to every similarity (units of the raw similarity, |a| <= D),
    drawn from seed per problem row, sweep, factor and codevector; seed=None draws one from torch's
    generator. stop: "fixed_point" (a sweep that changes nothing) | "similarity" (every factor's
    max |a| / D > theta). detect_cycles: L >= 2 also stops a problem caught in a limit cycle of period
    2..L. known: (..., F) integer codevector indices with -1 for unknown factors.
    asymmetry: fraction of similarity-codebook entries flipped once (the projection stays clean).
    arithmetic: "auto" | "bits" (bit-packed, cpu/cuda) | "float" (fp32 triton, float64 torch).
    backend: "auto" | "cuda" | "triton" | "cpu" | "torch".

    Returns ResonatorResult(indices (..., F) int64, iterations (...) int64, converged (...) bool,
    cycle (...) int64 period or 0, similarities (..., F) float32), readout sign-corrected: see
    pyinterp/reference/resonator.py for every rule."""
    allowed = _validation.FLOAT_DTYPES + (torch.complex64, torch.complex128, torch.int8)
    _validation.check_tensor(OP, "s", s, dtypes=allowed)
    if s.dim() < 1 or s.shape[-1] == 0:
        raise ValueError(f"{OP}: s must be (..., D) with D >= 1, got shape {tuple(s.shape)}")
    leading = tuple(s.shape[:-1])
    s2 = s.reshape(-1, s.shape[-1])
    dim = s2.shape[1]
    books = _codebook_list(codebooks, s)
    factors = len(books)
    sizes = [book.shape[0] for book in books]
    _validation.check_int(OP, "max_iters", max_iters, low=1, meaning="sweeps at most")
    _validation.check_choice(OP, "update", update, UPDATES)
    _validation.check_choice(OP, "weights", weights, WEIGHTS)
    _validation.check_choice(OP, "activation", activation, reference.ACTIVATIONS)
    _validation.check_choice(OP, "stop", stop, STOPS)
    _validation.check_choice(OP, "arithmetic", arithmetic, ARITHMETICS)
    phasors = s.is_complex()
    if activation == "attention":
        if beta is None:
            raise ValueError(f"{OP}: activation='attention' needs beta (the inverse temperature)")
        beta = _validation.check_number(OP, "beta", beta, low=0, low_open=True)
    if activation == "threshold":
        if threshold is None:
            raise ValueError(f"{OP}: activation='threshold' needs threshold (a fraction of D)")
        threshold = _validation.check_number(OP, "threshold", threshold)
    if activation == "topk":
        if k is None:
            raise ValueError(f"{OP}: activation='topk' needs k")
        _validation.check_int(OP, "k", k, low=1, high=min(sizes), meaning="at most the smallest M_f")
    if stop == "similarity":
        if theta is None:
            raise ValueError(f"{OP}: stop='similarity' needs theta (a fraction of D)")
        theta = _validation.check_number(OP, "theta", theta)
    noise = _validation.check_number(OP, "noise", noise, low=0)
    if noise > 0 and (dim + 7 * noise) * reference.similarity_scale(noise) * max(sizes) >= 1 << 53:
        raise ValueError(f"{OP}: noise={noise} is too large for exact sums at D = {dim}, M = "
                         f"{max(sizes)}: (D + 7 * noise) * 2^16 * M_f must stay below 2^53")
    asymmetry = _validation.check_number(OP, "asymmetry", asymmetry, low=0, high=1,
                                         meaning="a fraction of the entries")
    _validation.check_int(OP, "detect_cycles", detect_cycles, low=0)
    if detect_cycles == 1:
        raise ValueError(f"{OP}: detect_cycles must be 0 (off) or a longest period >= 2 (period 1 is "
                         "a fixed point, which stop='fixed_point' catches), got 1")
    if phasors and activation != "identity":
        raise ValueError(f"{OP}: activation={activation!r} is not defined for complex (FHRR) vectors; "
                         "they use activation='identity' with the phasor nonlinearity")
    if phasors and noise > 0:
        raise ValueError(f"{OP}: noise is defined for real vectors only, s is complex (FHRR)")
    if detect_cycles and (phasors or activation == "attention"):
        raise ValueError(f"{OP}: detect_cycles needs the discrete states of the sign activations on "
                         "real vectors")
    if detect_cycles and noise > 0:
        raise ValueError(f"{OP}: detect_cycles cannot be combined with noise > 0 (a revisited state "
                         "is no limit cycle when the noise differs)")
    if seed is None:
        seed = int(torch.randint(0, 1 << 62, (1,))) if (noise > 0 or asymmetry > 0) else 0
    _validation.check_int(OP, "seed", seed, low=0, high=(1 << 63) - 1)
    known2 = None
    if known is not None:
        _validation.check_tensor(OP, "known", known, dtypes=_validation.INDEX_DTYPES)
        _validation.check_same_device(OP, "s", s, known=known)
        _validation.check_shape(OP, "known", known, leading + (factors,), "s's leading dims, then F")
        known2 = known.reshape(-1, factors).to(torch.int64)
        for f, size in enumerate(sizes):
            column = known2[:, f]
            if column.numel() and (int(column.min()) < -1 or int(column.max()) >= size):
                raise IndexError(f"{OP}: known[..., {f}] must be -1 (unknown) or an index in "
                                 f"[0, {size}) (M_{f}), found values in [{int(column.min())}, "
                                 f"{int(column.max())}]")

    facts = _CodebookFacts.of(books)
    bipolar = not phasors and _is_bipolar(s2) and facts.bipolar(books)
    if not bipolar:  # +-1 values are finite: only other values need the check
        for name, tensor in [("s", s2)] + [(f"codebooks[{f}]", book) for f, book in enumerate(books)]:
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{OP}: {name} holds non-finite values")
    chosen = SPEC.resolve(backend, s.device, arithmetic=arithmetic, bipolar=bipolar,
                             phasors=phasors, weights=weights, activation=activation, noise=noise,
                             detect_cycles=detect_cycles, largest=max(sizes), dim=dim)
    if chosen == "torch":
        result = reference.resonator(
            s2, books, max_iters=max_iters, update=update, weights=weights, activation=activation,
            beta=beta, threshold=threshold, k=k, noise=noise, seed=seed, stop=stop, theta=theta,
            detect_cycles=detect_cycles, known=known2, asymmetry=asymmetry)
    else:
        scale = reference.similarity_scale(noise)
        threshold_units = reference.threshold_units(threshold, dim, scale) if threshold is not None else 0
        theta_units = reference.theta_units(theta, dim) if theta is not None else 0
        kernel_dtype = torch.float32 if chosen == "triton" else torch.int8
        projection = facts.concatenated(books, kernel_dtype)
        similarity = projection if asymmetry == 0 else torch.cat(
            [book.to(kernel_dtype) for book in reference.similarity_codebooks(books, asymmetry, seed)])
        known_kernel = known2.to(torch.int32).contiguous() if known2 is not None else None
        s_kernel = s2.to(kernel_dtype).contiguous()
        if chosen == "triton":
            outputs = SPEC.kernel(chosen)(
                s_kernel, similarity, projection, sizes, known_kernel, max_iters, update == "parallel",
                activation, k or 0, threshold_units, stop, theta_units)
        else:
            outputs = SPEC.kernel(chosen)(
                s_kernel, similarity, projection, sizes, known_kernel, max_iters, update == "parallel",
                activation, k or 0, threshold_units, noise, seed, stop, theta_units, detect_cycles)
        indices, iterations, converged, cycle, similarities = outputs
        result = ResonatorResult(indices.long(), iterations.long(), converged, cycle.long(),
                                 similarities)
    return ResonatorResult(result.indices.reshape(leading + (factors,)),
                           result.iterations.reshape(leading), result.converged.reshape(leading),
                           result.cycle.reshape(leading),
                           result.similarities.reshape(leading + (factors,)))
