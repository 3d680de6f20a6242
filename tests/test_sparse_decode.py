"""sparse_decode and its sparse kernels: every backend against the reference, forward and backward."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyinterp
from pyinterp.ops.sparse_decode import SPEC
from pyinterp.reference import sparse_decode as reference
from helpers import ALL_DTYPES, assert_close_to_float64, backend_device_pairs, exact_like

PAIRS = backend_device_pairs("sparse_decode")
# (N, k, M, D): N = 1, k = 1, k = M, D not a power of two, M not a multiple of 8.
SHAPES = [(1, 1, 5, 7), (1, 5, 5, 7), (13, 4, 67, 33), (6, 16, 203, 100)]


def _codes(n, k, m, *, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)]).to(torch.int32)
    values = exact_like((n, k), seed=seed + 1, dtype=dtype).abs()
    return values.to(device), indices.to(device)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_reference(backend, device, dtype, shape):
    n, k, m, d = shape
    values, indices = _codes(n, k, m, seed=sum(shape), device=device, dtype=dtype)
    W_dec = exact_like((m, d), seed=3, dtype=dtype, device=device)
    b_dec = exact_like((d,), seed=4, dtype=dtype, device=device)
    grad_out = exact_like((n, d), seed=5, device=device).double()

    def run(backend_name, cast):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (values, W_dec, b_dec)]
        out = pyinterp.sparse_decode(leaves[0], indices, leaves[1], leaves[2], backend=backend_name)
        (out.double() * grad_out).sum().backward()
        return [out] + [leaf.grad for leaf in leaves]

    got = run(backend, None)
    ref_lowp = run("torch", None)
    ref64 = run("torch", torch.float64)
    for name, a, r, r64 in zip(("x_hat", "grad values", "grad W_dec", "grad b_dec"), got, ref_lowp, ref64):
        assert_close_to_float64(a, r, r64, name)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_repeated_latents_and_int64_indices(backend, device):
    # The same latent several times in one row, and int64 indices at the boundary.
    values = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]], device=device)
    indices = torch.tensor([[2, 2, 0], [1, 1, 1]], device=device)
    W_dec = torch.arange(12, dtype=torch.float32, device=device).reshape(3, 4)
    out = pyinterp.sparse_decode(values, indices, W_dec, backend=backend)
    expected = torch.stack([3 * W_dec[2] + 3 * W_dec[0], W_dec[1]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_sparse_t_matmul_matches_reference(backend, device, dtype):
    coef = exact_like((17, 6), seed=8, dtype=dtype, device=device)
    rows = exact_like((17, 29), seed=9, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(10)
    indices = torch.randint(0, 11, (17, 6), generator=g, dtype=torch.int32).to(device)  # latent 11.. unused
    weight_grad, coef_sum = SPEC.kernel(backend).sparse_t_matmul(coef, indices, rows, 15)
    ref_grad, ref_sum = reference.sparse_t_matmul(coef.double(), indices, rows.double(), 15)
    assert weight_grad.dtype == dtype and coef_sum.dtype == torch.float32
    torch.testing.assert_close(weight_grad.double(), ref_grad.to(dtype).double(), rtol=0,
                               atol=torch.finfo(dtype).eps * ref_grad.abs().max().item())
    torch.testing.assert_close(coef_sum.double(), ref_sum, rtol=0, atol=0)
    assert weight_grad[11:].eq(0).all()


@pytest.mark.parametrize("backend,device", PAIRS)
def test_weight_gradient_is_bitwise_deterministic(backend, device):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(64, 8, generator=g).to(device)
    indices = torch.randint(0, 20, (64, 8), generator=g, dtype=torch.int32).to(device)
    W = torch.randn(20, 31, generator=g).to(device)
    grads = []
    for _ in range(2):
        W_dec = W.clone().requires_grad_()
        pyinterp.sparse_decode(values, indices, W_dec, backend=backend).sin().sum().backward()
        grads.append(W_dec.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_three_dimensional_codes(backend, device):
    values, indices = _codes(6, 3, 10, seed=1, device=device)
    W_dec = exact_like((10, 9), seed=2, device=device)
    out = pyinterp.sparse_decode(values.reshape(2, 3, 3), indices.reshape(2, 3, 3), W_dec, backend=backend)
    assert out.shape == (2, 3, 9)
    assert torch.equal(out.reshape(6, 9), pyinterp.sparse_decode(values, indices, W_dec, backend="torch"))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_opcheck(backend, device):
    values, indices = _codes(4, 3, 9, seed=2, device=device)
    W_dec = exact_like((9, 7), seed=3, device=device)
    b_dec = exact_like((7,), seed=4, device=device)
    torch.library.opcheck(torch.ops.pyinterp.sparse_decode.default,
                          (values, indices, W_dec, b_dec, backend, True))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 6, (4, 3), generator=g, dtype=torch.int32)
    tensors = [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
               for s in ((4, 3), (6, 5), (5,))]
    for backend in ("cpu", "torch"):
        assert torch.autograd.gradcheck(
            lambda v, W, b: pyinterp.sparse_decode(v, indices, W, b, backend=backend), tensors)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_compiles_with_fullgraph(backend, device):
    values, indices = _codes(5, 3, 11, seed=6, device=device)
    W_dec = exact_like((11, 7), seed=7, device=device).requires_grad_()

    def decode(v, i, W):
        return pyinterp.sparse_decode(v, i, W, backend=backend, check_indices=False).square().sum()

    loss = torch.compile(decode, fullgraph=True, backend="aot_eager")(values, indices, W_dec)
    loss.backward()
    assert torch.equal(loss.detach(), decode(values, indices, W_dec.detach()))
    assert W_dec.grad is not None


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 50), d=st.integers(1, 40), data=st.data())
def test_hypothesis_shapes_match_reference(n, m, d, data):
    k = data.draw(st.integers(1, m))
    backend = data.draw(st.sampled_from([b for b, dev in PAIRS if dev == "cpu"] or ["torch"]))
    values, indices = _codes(n, k, m, seed=n + m + d, device="cpu")
    W_dec = exact_like((m, d), seed=m, device="cpu")
    assert torch.equal(pyinterp.sparse_decode(values, indices, W_dec, backend=backend),
                       pyinterp.sparse_decode(values, indices, W_dec, backend="torch"))


class TestBadInput:
    values = torch.ones(3, 2)
    indices = torch.tensor([[0, 1], [2, 3], [4, 0]], dtype=torch.int32)
    W_dec = torch.ones(5, 4)

    @pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu"] + ["torch"])
    @pytest.mark.parametrize("bad", [5, -1, 1000])
    def test_index_out_of_range(self, backend, bad):
        indices = self.indices.clone()
        indices[1, 0] = bad
        with pytest.raises(IndexError, match=r"indices must lie in \[0, 5\)"):
            pyinterp.sparse_decode(self.values, indices, self.W_dec, backend=backend)

    def test_index_dtype(self):
        with pytest.raises(TypeError, match="indices must have dtype"):
            pyinterp.sparse_decode(self.values, self.indices.float(), self.W_dec)

    def test_shape_mismatches(self):
        with pytest.raises(ValueError, match="indices must have the shape of values"):
            pyinterp.sparse_decode(self.values, self.indices[:, :1], self.W_dec)
        with pytest.raises(ValueError, match="b_dec"):
            pyinterp.sparse_decode(self.values, self.indices, self.W_dec, torch.zeros(3))
        with pytest.raises(ValueError, match="W_dec must be 2-D"):
            pyinterp.sparse_decode(self.values, self.indices, torch.ones(5))

    def test_dtype_and_device_mismatch(self):
        with pytest.raises(TypeError, match="W_dec has dtype"):
            pyinterp.sparse_decode(self.values, self.indices, self.W_dec.half())
        with pytest.raises(ValueError, match="W_dec is on meta"):
            pyinterp.sparse_decode(self.values, self.indices, self.W_dec.to("meta"))

    @pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu"] + ["torch"])
    def test_empty_batch_gives_empty_output_and_gradients(self, backend):
        # Hosts such as sparsify call with 0 rows; the result is (0, D) and every gradient is zero.
        values = torch.ones(0, 2, requires_grad=True)
        W_dec = self.W_dec.clone().requires_grad_()
        out = pyinterp.sparse_decode(values, self.indices[:0], W_dec, torch.zeros(4), backend=backend)
        assert out.shape == (0, 4)
        out.sum().backward()
        assert values.grad.shape == (0, 2) and torch.equal(W_dec.grad, torch.zeros_like(W_dec))

    @pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu"] + ["torch"])
    @pytest.mark.parametrize("check_indices", [True, False])
    def test_int64_indices_are_checked_before_narrowing(self, backend, check_indices):
        # 2**32 + 3 narrowed to int32 first would decode W_dec[3]; the error reports the value passed.
        indices = torch.tensor([[2**32 + 3]])
        with pytest.raises(IndexError, match=str(2**32 + 3)):
            pyinterp.sparse_decode(torch.ones(1, 1), indices, self.W_dec, backend=backend,
                                   check_indices=check_indices)

    def test_no_features_or_latents(self):
        with pytest.raises(ValueError, match="W_dec must be"):
            pyinterp.sparse_decode(self.values, self.indices, torch.ones(5, 0))
        with pytest.raises(ValueError, match="W_dec must be"):
            pyinterp.sparse_decode(self.values, self.indices, torch.ones(0, 4))

    def test_bias_that_is_not_a_tensor(self):
        with pytest.raises(TypeError, match="b_dec must be a torch.Tensor"):
            pyinterp.sparse_decode(self.values, self.indices, self.W_dec, [0.0] * 4)


@pytest.mark.parametrize("backend,device", backend_device_pairs("sparse_decode"))
def test_unchecked_out_of_range_indices_are_never_read(backend, device):
    # check_indices=False: an out-of-range int32 index is never read through. cuda and triton count
    # its entry as zero (forward and backward); cpu checks anyway and raises naming the index.
    W = torch.randn(6, 5, device=device, requires_grad=True)
    values = torch.ones(3, 2, device=device, requires_grad=True)
    indices = torch.tensor([[1, 6], [-1, 2], [2**30, 0]], dtype=torch.int32, device=device)
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="out of range"):
            pyinterp.sparse_decode(values, indices, W, backend=backend, check_indices=False)
        return
    out = pyinterp.sparse_decode(values, indices, W, backend=backend, check_indices=False)
    valid = (indices >= 0) & (indices < 6)
    expected = pyinterp.sparse_decode(values * valid, torch.where(valid, indices, 0), W,
                                      backend="torch")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.sum().backward()
    assert values.grad[~valid].eq(0).all()
    torch.testing.assert_close(W.grad.sum(0), (values * valid).sum() * torch.ones(5, device=device),
                               rtol=0, atol=1e-5)
