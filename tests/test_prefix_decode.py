"""prefix_decode (Matryoshka): every backend against the per-prefix reference, forward and backward,
over odd shapes and dtypes; gradcheck in float64; bad input names the argument."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from pyinterp.reference import prefix_decode as reference
from helpers import ALL_DTYPES, assert_close_to_float64, backend_device_pairs

PAIRS = backend_device_pairs("prefix_decode")
FLOAT64_PAIRS = [(b, d) for b, d in PAIRS if b != "cuda"]  # the CUDA kernels take fp32/fp16/bf16
# (N, k, M, D, prefixes): one latent and one prefix; a bucket no row uses; k > a bucket's size; odd sizes.
SHAPES = [(1, 1, 1, 1, [1]), (5, 3, 7, 9, [1, 3, 7]), (13, 8, 67, 33, [4, 16, 40, 67]),
          (6, 40, 203, 100, [12, 25, 50, 101, 203])]


def _problem(n, k, m, d, *, seed, dtype=torch.float64, device="cpu", leading=None):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=g, dtype=torch.float64).relu()  # zeros too, as after a ReLU
    indices = torch.randint(0, m, (n, k), generator=g, dtype=torch.int32)
    W_dec = torch.randn(m, d, generator=g, dtype=torch.float64)
    b_dec = torch.randn(d, generator=g, dtype=torch.float64)
    if leading is not None:
        values, indices = values.reshape(*leading, k), indices.reshape(*leading, k)
    return (values.to(device=device, dtype=dtype), indices.to(device), W_dec.to(device=device, dtype=dtype),
            b_dec.to(device=device, dtype=dtype))


def _widest(backend: str) -> torch.dtype:
    return torch.float32 if backend == "cuda" else torch.float64


def _dense(values, indices, W_dec, prefixes, b_dec):
    """Per-prefix dense decodes: the dense code f (N, M) truncated to its first m_p latents."""
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype)
    dense.scatter_add_(1, indices.long(), values)
    return torch.stack([dense[:, :m] @ W_dec[:m] + b_dec for m in prefixes])


def test_reference_equals_dense_decodes_of_each_prefix():
    values, indices, W_dec, b_dec = _problem(9, 6, 40, 11, seed=1)
    prefixes = [3, 10, 40]
    want = _dense(values, indices, W_dec, prefixes, b_dec)
    torch.testing.assert_close(reference.prefix_decode(values, indices, W_dec, prefixes, b_dec), want)


@pytest.mark.parametrize("backend,device", FLOAT64_PAIRS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_backward_match_reference_in_float64(backend, device, shape, with_bias):
    n, k, m, d, prefixes = shape
    values, indices, W_dec, b_dec = _problem(n, k, m, d, seed=sum(prefixes), device=device)
    b_dec = b_dec if with_bias else None
    grad = torch.randn(len(prefixes), n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(device)
    results = {}
    for name in (backend, "torch"):
        leaves = [t.clone().requires_grad_() for t in (values, W_dec)] + (
            [b_dec.clone().requires_grad_()] if with_bias else [])
        out = pyinterp.prefix_decode(leaves[0], indices, leaves[1], prefixes, leaves[2] if with_bias else None,
                                     backend=name)
        out.backward(grad)
        results[name] = (out, *[t.grad for t in leaves])
    for got, want, what in zip(results[backend], results["torch"], ("out", "values", "W_dec", "b_dec")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=what)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_low_precision_within_twice_the_reference_error(backend, device, dtype):
    n, k, m, d, prefixes = SHAPES[2]
    problem64 = _problem(n, k, m, d, seed=7, device=device)
    values, indices, W_dec, b_dec = (t.to(dtype) if t.is_floating_point() else t for t in problem64)
    grad64 = torch.randn(len(prefixes), n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)

    def run(name, vals, weight, bias, grad):
        vals, weight = vals.clone().requires_grad_(), weight.clone().requires_grad_()
        out = pyinterp.prefix_decode(vals, indices, weight, prefixes, bias, backend=name)
        out.backward(grad)
        return out, vals.grad, weight.grad

    got = run(backend, values, W_dec, b_dec, grad64.to(dtype))
    lowp = run("torch", values, W_dec, b_dec, grad64.to(dtype))
    exact = run("torch", problem64[0], problem64[2], problem64[3], grad64)
    for g, lo, ex, what in zip(got, lowp, exact, ("out", "values grad", "W_dec grad")):
        assert_close_to_float64(g, lo, ex, what)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_last_prefix_is_sparse_decode_and_leading_dims_are_kept(backend, device):
    values, indices, W_dec, b_dec = _problem(6, 4, 30, 7, seed=2, device=device, leading=(2, 3),
                                             dtype=_widest(backend))
    out = pyinterp.prefix_decode(values, indices, W_dec, [5, 30], b_dec, backend=backend)
    assert out.shape == (2, 2, 3, 7)
    torch.testing.assert_close(out[-1], pyinterp.sparse_decode(values, indices, W_dec, b_dec, backend="torch"))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_no_rows_in_no_rows_out_and_zero_gradients(backend, device):
    values, indices, W_dec, b_dec = _problem(0, 3, 10, 4, seed=0, device=device, dtype=_widest(backend))
    W_dec.requires_grad_()
    out = pyinterp.prefix_decode(values, indices, W_dec, [2, 10], b_dec, backend=backend)
    assert out.shape == (2, 0, 4)
    out.sum().backward()
    assert W_dec.grad is not None and not W_dec.grad.any()


def test_gradcheck_cpu_float64():
    values, indices, W_dec, b_dec = _problem(4, 5, 12, 3, seed=4)
    inputs = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
    assert torch.autograd.gradcheck(
        lambda v, w, b: pyinterp.prefix_decode(v, indices, w, [2, 5, 12], b, backend="cpu"), inputs)


@pytest.mark.parametrize("prefixes,error,match", [
    ([4, 4, 12], ValueError, r"prefixes must be strictly increasing"),
    ([6, 3, 12], ValueError, r"prefixes must be strictly increasing"),
    ([3, 6], ValueError, r"prefixes\[-1\] must be W_dec.shape\[0\] = 12"),
    ([3, 6, 13], ValueError, r"prefixes\[-1\] must be W_dec.shape\[0\] = 12"),
    ([0, 12], ValueError, r"prefixes\[0\] must be in"),
    ([], TypeError, r"prefixes must be a non-empty list"),
    ([2.5, 12], TypeError, r"prefixes\[0\] must be an int"),
])
def test_bad_prefixes_raise_naming_the_argument(prefixes, error, match):
    values, indices, W_dec, b_dec = _problem(3, 2, 12, 4, seed=0)
    with pytest.raises(error, match=match):
        pyinterp.prefix_decode(values, indices, W_dec, prefixes, b_dec)


def test_bad_indices_raise_naming_the_argument():
    values, indices, W_dec, b_dec = _problem(3, 2, 12, 4, seed=0)
    with pytest.raises(IndexError, match="prefix_decode: indices must lie in"):
        pyinterp.prefix_decode(values, indices + 12, W_dec, [4, 12], b_dec)
    with pytest.raises(ValueError, match="indices must have the shape of values"):
        pyinterp.prefix_decode(values, indices[:, :1], W_dec, [4, 12], b_dec)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_unchecked_out_of_range_indices_are_never_read_through(backend, device):
    values, indices, W_dec, b_dec = _problem(4, 3, 10, 5, seed=6, device=device, dtype=_widest(backend))
    indices[1, 2] = 10
    if backend == "cpu":  # the C++ kernel checks anyway, at no cost
        with pytest.raises(RuntimeError, match=r"indices\[1, 2\] = 10 is out of range"):
            pyinterp.prefix_decode(values, indices, W_dec, [3, 10], b_dec, backend=backend, check_indices=False)
        return
    got = pyinterp.prefix_decode(values, indices, W_dec, [3, 10], b_dec, backend=backend, check_indices=False)
    values[1, 2], indices[1, 2] = 0, 0
    torch.testing.assert_close(got, reference.prefix_decode(values, indices, W_dec, [3, 10], b_dec))


@pytest.mark.parametrize("request_, reason", [
    ({"num_prefixes": 65, "dtype": torch.float32}, "at most 64 prefixes, got 65"),
    ({"num_prefixes": 3, "dtype": torch.float64}, "got float64"),
])
def test_cuda_declines_what_its_kernels_cannot_run(request_, reason):
    # backend="auto" then takes triton on CUDA tensors; an explicit backend="cuda" raises with this reason
    from pyinterp.ops.prefix_decode import SPEC
    assert reason in SPEC.unsupported("cuda", **request_)
    assert SPEC.unsupported("cuda", num_prefixes=64, dtype=torch.bfloat16) == ""
    assert SPEC.unsupported("triton", **request_) == ""
