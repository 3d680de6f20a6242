"""Property-based fuzz over every public op and every backend here (issue 10, "Build"): for random
shapes, dtypes and values (NaN and inf included, empty batches, odd shapes) each backend equals the
reference (bitwise on exact data, else within dtype tolerance); bad arguments (wrong dtypes,
devices and shapes, lists, numpy arrays) raise an error that names the argument.

The CI run draws few examples per op; `-m slow` runs the same properties with many more."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import pyinterp
from pyinterp.ops.resonator import resonator
from pyinterp.reference.ij_accumulate import ij_accumulate as ij_reference
from pyinterp.vsa import random_codebooks, random_problems
from helpers import backends

FUZZ_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CI = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SPECIALS = (float("nan"), float("inf"), float("-inf"))


def exact(draw, shape, scale=0.25, low=-4, high=4):
    """Small multiples of `scale`: every sum and product below stays exact in fp32."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, shape, generator=g).to(torch.float64) * scale


def sprinkle(draw, t: torch.Tensor) -> torch.Tensor:
    """Put a few NaN / +-inf entries into t (sometimes none)."""
    t = t.clone()
    if t.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    return t


def supported(backend: str, dtype: torch.dtype, op: str) -> bool:
    # The Triton encoder has no float64 path (the op says so by name: checked in the bad-input test).
    return not (op == "topk_encode" and backend == "triton" and dtype == torch.float64)


# ---- topk_encode ----
@st.composite
def encode_cases(draw):
    n, d, m = draw(st.integers(0, 5)), draw(st.integers(1, 24)), draw(st.integers(1, 40))
    k = draw(st.integers(1, m))
    dtype = draw(st.sampled_from(FUZZ_DTYPES))
    x = sprinkle(draw, exact(draw, (n, d), scale=1.0, low=-2, high=2))
    W = exact(draw, (m, d))
    b_enc = sprinkle(draw, exact(draw, (m,))) if draw(st.booleans()) else None
    b_dec = exact(draw, (d,), scale=1.0, low=-2, high=2) if draw(st.booleans()) else None
    k_aux = draw(st.integers(0, m))
    dead = torch.tensor(draw(st.lists(st.booleans(), min_size=m, max_size=m))) if k_aux else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(x=cast(x), W_enc=cast(W), b_enc=cast(b_enc), k=k, b_dec=cast(b_dec), dead_mask=dead,
                k_aux=k_aux)


def check_topk_encode(case):
    args = dict(case)
    x, W, b, k = args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), args.pop("k")
    want = pyinterp.topk_encode(x, W, b, k, backend="torch", **args)
    for backend in backends("topk_encode"):
        if not supported(backend, x.dtype, "topk_encode"):
            continue
        got = pyinterp.topk_encode(x, W, b, k, backend=backend, **args)
        assert len(got) == len(want)
        for name, g, w in zip(("values", "indices", "aux_values", "aux_indices"), got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{backend} {name}: {m}")


@CI
@given(encode_cases())
def test_fuzz_topk_encode(case):
    check_topk_encode(case)


@pytest.mark.slow
@SLOW
@given(encode_cases())
def test_fuzz_topk_encode_long(case):
    check_topk_encode(case)


# ---- sparse_decode (forward and backward) ----
@st.composite
def decode_cases(draw):
    n, k, m, d = (draw(st.integers(0, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 30)),
                  draw(st.integers(1, 40)))
    dtype = draw(st.sampled_from(FUZZ_DTYPES))
    values = sprinkle(draw, exact(draw, (n, k)))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    indices = torch.tensor(draw(st.lists(st.integers(0, m - 1), min_size=n * k, max_size=n * k)),
                           dtype=index_dtype).reshape(n, k)
    W = exact(draw, (m, d))
    b_dec = exact(draw, (d,)) if draw(st.booleans()) else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(values), indices, cast(W), cast(b_dec)


def check_sparse_decode(case):
    values, indices, W, b_dec = case

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (values, W)]
        out = pyinterp.sparse_decode(leaves[0], indices, leaves[1], b_dec, backend=backend)
        out.double().sum().backward()
        return out, leaves[0].grad, leaves[1].grad

    want = run("torch")
    for backend in backends("sparse_decode"):
        for name, g, w in zip(("out", "grad values", "grad W_dec"), run(backend), want):
            # Exact data: the sums are exact in fp32, so only the one rounding to the dtype remains.
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{backend} {name}: {m}")


@CI
@given(decode_cases())
def test_fuzz_sparse_decode(case):
    check_sparse_decode(case)


@pytest.mark.slow
@SLOW
@given(decode_cases())
def test_fuzz_sparse_decode_long(case):
    check_sparse_decode(case)


# ---- ij_accumulate ----
@st.composite
def ij_cases(draw):
    shape = (draw(st.integers(0, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
             *draw(st.lists(st.integers(1, 9), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from(FUZZ_DTYPES))
    grads = sprinkle(draw, exact(draw, shape)).to(dtype)
    weights = sprinkle(draw, exact(draw, shape[:1])).to(dtype)
    delta = exact(draw, shape[2:]).to(dtype)
    return grads, weights, delta


def check_ij_accumulate(case):
    grads, weights, delta = case
    p_want, j_want = ij_reference(grads, weights, delta, return_jbar=True)
    for backend in backends("ij_accumulate"):
        P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend=backend)
        torch.testing.assert_close(P, p_want, rtol=0, atol=0, equal_nan=True, msg=backend)
        torch.testing.assert_close(Jbar, j_want, rtol=0, atol=0, equal_nan=True, msg=backend)


@CI
@given(ij_cases())
def test_fuzz_ij_accumulate(case):
    check_ij_accumulate(case)


@pytest.mark.slow
@SLOW
@given(ij_cases())
def test_fuzz_ij_accumulate_long(case):
    check_ij_accumulate(case)


# ---- resonator ----
@st.composite
def resonator_cases(draw):
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    dim = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 1000))
    codebooks = random_codebooks(sizes, dim, seed=seed)
    s, _ = random_problems(codebooks, draw(st.integers(0, 4)), seed=seed + 1)
    variant = draw(st.sampled_from([dict(), dict(update="parallel"),
                                    dict(activation="topk", k=min(sizes)),
                                    dict(activation="threshold", threshold=0.1)]))
    return s, codebooks, variant


def check_resonator(case):
    s, codebooks, variant = case
    want = resonator(s, codebooks, max_iters=8, backend="torch", **variant)
    for backend in backends("resonator"):
        got = resonator(s, codebooks, max_iters=8, backend=backend, **variant)
        for name in ("indices", "iterations", "converged", "similarities"):
            assert torch.equal(getattr(got, name), getattr(want, name)), f"{backend} {name}"


@CI
@given(resonator_cases())
def test_fuzz_resonator(case):
    check_resonator(case)


@pytest.mark.slow
@SLOW
@given(resonator_cases())
def test_fuzz_resonator_long(case):
    check_resonator(case)


# ---- bad arguments: a clear error naming the argument, on every backend ----
def _encode(backend, **overrides):
    args = dict(x=torch.ones(3, 4), W_enc=torch.ones(5, 4), b_enc=torch.zeros(5), k=2)
    args.update(overrides)
    return pyinterp.topk_encode(args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), args.pop("k"),
                                backend=backend, **args)


def _decode(backend, **overrides):
    args = dict(values=torch.ones(3, 2), indices=torch.zeros(3, 2, dtype=torch.int32),
                W_dec=torch.ones(5, 4))
    args.update(overrides)
    return pyinterp.sparse_decode(args.pop("values"), args.pop("indices"), args.pop("W_dec"),
                                  backend=backend, **args)


def _ij(backend, **overrides):
    args = dict(grads=torch.ones(2, 1, 3, 4), weights=torch.ones(2), delta=torch.ones(3, 4))
    args.update(overrides)
    return pyinterp.ij_accumulate(args.pop("grads"), args.pop("weights"), args.pop("delta"),
                                  backend=backend, **args)


def _factor(backend, **overrides):
    books = random_codebooks([3, 4], 16, seed=0)
    args = dict(s=random_problems(books, 2, seed=1)[0], codebooks=books)
    args.update(overrides)
    return resonator(args.pop("s"), args.pop("codebooks"), max_iters=4, backend=backend, **args)


BAD = [
    ("topk_encode", _encode, "x", dict(x=torch.ones(3, 4, dtype=torch.int32))),
    ("topk_encode", _encode, "x", dict(x=[[1.0] * 4] * 3)),
    ("topk_encode", _encode, "x", dict(x=np.ones((3, 4), dtype=np.float32))),
    ("topk_encode", _encode, "W_enc", dict(W_enc=torch.ones(5, 3))),
    ("topk_encode", _encode, "b_enc", dict(b_enc=[0.0] * 5)),
    ("topk_encode", _encode, "b_enc", dict(b_enc=torch.zeros(4))),
    ("topk_encode", _encode, "b_dec", dict(b_dec=np.zeros(4, dtype=np.float32))),
    ("topk_encode", _encode, "b_dec", dict(b_dec=torch.zeros(4, device="meta"))),
    ("topk_encode", _encode, "k", dict(k=6)),
    ("topk_encode", _encode, "k", dict(k=2.5)),
    ("topk_encode", _encode, "dead_mask", dict(dead_mask=[True] * 5, k_aux=1)),
    ("topk_encode", _encode, "W_enc", dict(W_enc=torch.ones(5, 4, dtype=torch.float64))),
    ("topk_encode", _encode, "x", dict(x=torch.ones(3, 4, dtype=torch.float64),
                                       W_enc=torch.ones(5, 4, dtype=torch.float64),
                                       b_enc=torch.zeros(5, dtype=torch.float64))),
    ("sparse_decode", _decode, "values", dict(values=[[1.0, 1.0]] * 3)),
    ("sparse_decode", _decode, "indices", dict(indices=torch.zeros(3, 2))),
    ("sparse_decode", _decode, "indices", dict(indices=np.zeros((3, 2), dtype=np.int32))),
    ("sparse_decode", _decode, "indices", dict(indices=torch.zeros(3, 3, dtype=torch.int32))),
    ("sparse_decode", _decode, "indices", dict(indices=torch.full((3, 2), 5, dtype=torch.int32))),
    ("sparse_decode", _decode, "indices", dict(indices=torch.full((3, 2), -1, dtype=torch.int64))),
    ("sparse_decode", _decode, "W_dec", dict(W_dec=torch.ones(5, 4, dtype=torch.float16))),
    ("sparse_decode", _decode, "b_dec", dict(b_dec=torch.ones(3))),
    ("ij_accumulate", _ij, "grads", dict(grads=torch.ones(2, 1, 3, 4, dtype=torch.int64))),
    ("ij_accumulate", _ij, "weights", dict(weights=torch.ones(3))),
    ("ij_accumulate", _ij, "weights", dict(weights=[1.0, 1.0])),
    ("ij_accumulate", _ij, "delta", dict(delta=torch.ones(3, 5))),
    ("ij_accumulate", _ij, "P", dict(P=torch.zeros(1, 3, dtype=torch.float64))),
    ("resonator", _factor, "codebooks", dict(codebooks=[torch.ones(3, 15)])),
    ("resonator", _factor, "codebooks", dict(codebooks=[torch.ones(0, 16)])),
    ("resonator", _factor, "codebooks", dict(codebooks="abc")),
    ("resonator", _factor, "s", dict(s=np.ones((2, 16), dtype=np.float32))),
    ("resonator", _factor, "known", dict(known=torch.full((2, 2), 7))),
]


@pytest.mark.parametrize("op,call,name,overrides", BAD,
                         ids=[f"{op}-{name}-{i}" for i, (op, _, name, _) in enumerate(BAD)])
def test_bad_arguments_name_the_argument(op, call, name, overrides):
    for backend in backends(op) + ["auto"]:
        if "x" in overrides and getattr(overrides["x"], "dtype", None) == torch.float64 \
                and backend != "triton":
            continue  # float64 is valid on every backend but Triton's encoder
        with pytest.raises((TypeError, ValueError, IndexError, RuntimeError)) as info:
            call(backend, **overrides)
        assert name in str(info.value), f"{backend}: {info.value}"
