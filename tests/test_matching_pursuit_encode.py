"""matching_pursuit_encode (MP-SAE): every backend (and the cpu kernel's Gram-matrix path) against the
reference, forward and backward; gradcheck of the unrolled loop in float64; the positive-only variant and
SAELens' numbers; the residual-threshold and duplicate-support stops; bad input; empty batches."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from pyinterp.ops.matching_pursuit_encode import gram_matrix
from helpers import ALL_DTYPES, backend_device_pairs

PAIRS = backend_device_pairs("matching_pursuit_encode")
# (backend, device, use_gram): every kernel runs with and without the Gram matrix; the cheaper checks
# leave out the Triton interpreter's Gram path.
KERNELS = [(b, d, g) for b, d in PAIRS for g in (False, True)]
QUICK_KERNELS = [(b, d, g) for b, d, g in KERNELS if not (b == "triton" and g)]
# (N, D, M, k): one of everything, M < D, k = D, odd sizes.
SHAPES = [(1, 1, 1, 1), (1, 7, 5, 7), (13, 33, 67, 8), (3, 50, 203, 20)]


def _problem(n, d, m, *, seed, dtype=torch.float64, device="cpu", unit_rows=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    W = W / W.norm(dim=1, keepdim=True)
    if not unit_rows:  # norms near 1: far from 1, c = <r, w> overshoots and the residual grows each step
        W = W * (0.7 + 0.5 * torch.rand(m, 1, generator=g, dtype=torch.float64))
    b_dec = torch.randn(d, generator=g, dtype=torch.float64) / 4
    return [t.to(device=device, dtype=dtype) for t in (x, W, b_dec)]


def _encode(backend, use_gram, x, W, k, b_dec=None, **options):
    gram = gram_matrix(W) if use_gram else None
    return pyinterp.matching_pursuit_encode(x, W, k, b_dec=b_dec, gram=gram, backend=backend, **options)


def _dense(values, indices, m):
    """The latent activations as SAELens returns them: slots scatter-added per latent."""
    return torch.zeros(values.shape[0], m, dtype=values.dtype).scatter_add_(1, indices.long(), values)


@pytest.mark.parametrize("backend,device,use_gram", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("positive", [True, False])
def test_forward_float64_matches_reference(backend, device, use_gram, shape, positive):
    n, d, m, k = shape
    x, W, b_dec = _problem(n, d, m, seed=sum(shape), device=device)
    got = _encode(backend, use_gram, x, W, k, b_dec, positive=positive)
    want = _encode("torch", False, x, W, k, b_dec, positive=positive)
    assert got.indices.dtype == torch.int32 and got.values.dtype == torch.float64
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.values, want.values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device,use_gram", QUICK_KERNELS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_forward_low_precision_matches_reference(backend, device, use_gram, dtype):
    x, W, b_dec = _problem(11, 24, 57, seed=4, dtype=dtype, device=device)
    got = _encode(backend, use_gram, x, W, 6, b_dec, positive=False)
    want = _encode("torch", False, x, W, 6, b_dec, positive=False)
    assert got.values.dtype == dtype
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.values, want.values)


@pytest.mark.parametrize("backend,device,use_gram", QUICK_KERNELS)
def test_leading_dims_are_restored(backend, device, use_gram):
    x, W, b_dec = _problem(12, 9, 20, seed=5, device=device)
    got = _encode(backend, use_gram, x.reshape(3, 4, 9), W, 4, b_dec)
    want = _encode("torch", False, x, W, 4, b_dec)
    assert got.values.shape == (3, 4, 4)
    assert torch.equal(got.indices.reshape(12, 4), want.indices)


def _grads(backend, use_gram, inputs, k, weight, **options):
    leaves = [t.clone().requires_grad_() for t in inputs]
    x, W, b_dec = leaves
    out = _encode(backend, use_gram, x, W, k, b_dec, **options)
    # The loss of training: values weighted, and the decode that the values feed.
    decoded = pyinterp.sparse_decode(out.values, out.indices, W, b_dec, backend="torch")
    ((out.values * weight).sum() + decoded.pow(2).sum()).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend,device,use_gram", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("positive", [True, False])
def test_backward_matches_reference_autograd(backend, device, use_gram, dtype, positive):
    inputs = _problem(9, 13, 31, seed=6, dtype=dtype, device=device, unit_rows=False)
    weight = torch.randn(9, 7, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device, dtype)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-4
    got = _grads(backend, use_gram, inputs, 7, weight, positive=positive)
    want = _grads("torch", False, inputs, 7, weight, positive=positive)
    for name, a, b in zip(("x", "W_dec", "b_dec"), got, want):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


# The Triton backend runs the same backward (its own sparse_t_matmul), checked against the reference's
# autograd above; its gradcheck would take a minute of the interpreter's forward calls.
@pytest.mark.parametrize("backend,device,use_gram",
                         [c for c in KERNELS if c[0] != "triton"] + [("torch", "cpu", False)])
@pytest.mark.parametrize("positive", [True, False])
def test_gradcheck_float64_of_the_unrolled_loop(backend, device, use_gram, positive):
    # Random data: every selection wins by far more than the finite-difference step, so the loop is
    # smooth around the point and the numerical Jacobian is the unrolled loop's.
    x, W, b_dec = _problem(3, 5, 7, seed=8, device=device, unit_rows=False)

    def f(x, W, b_dec):
        return pyinterp.matching_pursuit_encode(x, W, 4, b_dec=b_dec, positive=positive, backend=backend,
                                                gram=gram_matrix(W) if use_gram else None).values

    leaves = [t.clone().requires_grad_() for t in (x, W, b_dec)]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,device,use_gram", QUICK_KERNELS + [("torch", "cpu", False)])
def test_positive_variant_keeps_positive_coefficients_and_lists_nothing_for_negative_scores(backend, device,
                                                                                            use_gram):
    W = torch.eye(3, dtype=torch.float64, device=device)
    x = torch.tensor([[-1.0, -2.0, -0.5], [3.0, -2.0, 1.0]], dtype=torch.float64, device=device)
    positive = _encode(backend, use_gram, x, W, 3, positive=True)
    signed = _encode(backend, use_gram, x, W, 3, positive=False)
    assert positive.values.tolist() == [[0, 0, 0], [3, 1, 0]]
    assert positive.indices.tolist() == [[0, 0, 0], [0, 2, 0]]
    assert signed.values.tolist() == [[-2, -1, -0.5], [3, -2, 1]]
    assert signed.indices.tolist() == [[1, 0, 2], [0, 1, 2]]


def test_positive_variant_gives_saelens_numbers():
    saelens = pytest.importorskip("sae_lens.saes.matching_pursuit_sae")
    x, W, b_dec = _problem(16, 6, 15, seed=9)
    for threshold, duplicate in ((0.0, False), (0.6, False), (0.0, True), (0.6, True)):
        theirs = saelens._encode_matching_pursuit(x - b_dec, W, threshold, max_iterations=6,
                                                  stop_on_duplicate_support=duplicate)
        # Triton follows the same rules: test_stopping_rules_match_reference_on_random_data.
        for backend, _, use_gram in [c for c in KERNELS if c[0] != "triton"] + [("torch", "cpu", False)]:
            ours = _encode(backend, use_gram, x, W, 6, b_dec, positive=True, residual_threshold=threshold,
                           stop_on_duplicate_support=duplicate)
            torch.testing.assert_close(_dense(*ours, 15), theirs, rtol=1e-12, atol=1e-12,
                                       msg=f"{backend} gram={use_gram} threshold={threshold} duplicate={duplicate}")
    listed = (_encode("torch", False, x, W, 6, b_dec, positive=True, stop_on_duplicate_support=True).values != 0)
    assert (listed.sum(1) < 6).any(), "the duplicate-support stop must end some rows early"


@pytest.mark.parametrize("backend,device,use_gram", QUICK_KERNELS + [("torch", "cpu", False)])
def test_residual_threshold_stops_each_row_after_its_own_step(backend, device, use_gram):
    # Orthonormal atoms: each step takes the largest remaining coordinate, so the residual norms are known.
    W = torch.eye(6, dtype=torch.float64, device=device)
    x = torch.tensor([[5.0, 4, 3, 2, 1, 0.5], [0.25, 0, 0, 0, 0, 0.1], [2, 2, 2, 2, 2, 2]],
                     dtype=torch.float64, device=device)
    # ||r|| after 3 steps of row 0: sqrt(4 + 1 + 0.25) < 2.5; row 1 stops after its first step (the first
    # step always runs); row 2 after 5 steps (||r|| = 2), ties to the lower index.
    out = _encode(backend, use_gram, x, W, 6, positive=False, residual_threshold=2.5)
    assert out.values.tolist() == [[5, 4, 3, 0, 0, 0], [0.25, 0, 0, 0, 0, 0], [2, 2, 2, 2, 2, 0]]
    assert out.indices.tolist() == [[0, 1, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0]]


@pytest.mark.parametrize("backend,device,use_gram", KERNELS)
@pytest.mark.parametrize("positive", [True, False])
def test_stopping_rules_match_reference_on_random_data(backend, device, use_gram, positive):
    x, W, b_dec = _problem(30, 4, 9, seed=10, device=device)
    options = dict(positive=positive, residual_threshold=0.5, stop_on_duplicate_support=True)
    got = _encode(backend, use_gram, x, W, 4, b_dec, **options)
    want = _encode("torch", False, x, W, 4, b_dec, **options)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.values, want.values, rtol=1e-12, atol=1e-12)
    assert (want.values == 0).any(), "some row must have stopped early"


@pytest.mark.parametrize("backend,device", PAIRS + [("torch", "cpu")])
def test_empty_batch_gives_empty_outputs_and_zero_gradients(backend, device):
    x = torch.zeros(0, 6, device=device, requires_grad=True)
    W = torch.randn(8, 6, device=device, requires_grad=True)
    out = pyinterp.matching_pursuit_encode(x, W, 3, backend=backend)
    assert out.values.shape == (0, 3) and out.indices.shape == (0, 3)
    pyinterp.sparse_decode(out.values, out.indices, W, None).sum().backward()
    assert W.grad is not None and W.grad.eq(0).all() and x.grad.shape == (0, 6)


def test_bad_input_names_the_argument():
    x, W = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="k must be in \\[1, 4\\]"):
        pyinterp.matching_pursuit_encode(x, W, 5)
    with pytest.raises(ValueError, match="k must be"):
        pyinterp.matching_pursuit_encode(x, W, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        pyinterp.matching_pursuit_encode(x, W, 2.0)
    with pytest.raises(ValueError, match="W_dec"):
        pyinterp.matching_pursuit_encode(x, torch.randn(6, 5), 2)
    with pytest.raises(ValueError, match="W_dec"):
        pyinterp.matching_pursuit_encode(x, torch.randn(6), 2)
    with pytest.raises(ValueError, match="b_dec"):
        pyinterp.matching_pursuit_encode(x, W, 2, b_dec=torch.randn(5))
    with pytest.raises(TypeError, match="W_dec"):
        pyinterp.matching_pursuit_encode(x, W.double(), 2)
    with pytest.raises(ValueError, match="residual_threshold"):
        pyinterp.matching_pursuit_encode(x, W, 2, residual_threshold=-1.0)
    with pytest.raises(ValueError, match="gram"):
        pyinterp.matching_pursuit_encode(x, W, 2, gram=torch.randn(5, 5))
    with pytest.raises(TypeError, match="gram"):
        pyinterp.matching_pursuit_encode(x, W, 2, gram=torch.randn(6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="x"):
        pyinterp.matching_pursuit_encode(x.int(), W, 2)
