"""threshold_encode (JumpReLU): every backend against the reference, forward and backward, the STE
against its closed form, gradcheck of the smooth part in float64, bad input."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from pyinterp.ops.threshold_encode import SPEC
from pyinterp.reference import threshold_encode as reference
from pyinterp.reference.topk_encode import preactivations
from helpers import ALL_DTYPES, backend_device_pairs, exact_sae_data

PAIRS = backend_device_pairs("threshold_encode")
# (N, D, M, max_active): N = 1, cap 1, cap = M, odd D and M; the thresholds truncate some rows.
SHAPES = [(1, 7, 5, 1), (1, 7, 5, 5), (13, 33, 67, 4), (6, 100, 203, 40)]


def _runnable(pairs, dtypes):
    """(backend, device, dtype) cases the op's spec accepts (Triton has no float64 path)."""
    return [(b, d, t) for b, d in pairs for t in dtypes if not SPEC.unsupported(b, dtype=t)]


def _threshold(m, *, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 9, (m,), generator=g).to(torch.float64) / 4).to(device=device, dtype=dtype)


def _run(backend, data, threshold, cap, **kwargs):
    return pyinterp.threshold_encode(data["x"], data["W_enc"], data["b_enc"], threshold, cap,
                                     b_dec=data["b_dec"], backend=backend, **kwargs)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bandwidth", [0.0, 0.5])
def test_forward_exact_data_matches_reference_bitwise(backend, device, dtype, shape, bandwidth):
    n, d, m, cap = shape
    data = exact_sae_data(n, d, m, dtype=dtype, device=device, seed=sum(shape))
    threshold = _threshold(m, seed=n, dtype=dtype, device=device)
    got = _run(backend, data, threshold, cap, bandwidth=bandwidth)
    want = _run("torch", data, threshold, cap, bandwidth=bandwidth)
    assert got.indices.dtype == torch.int32 and got.counts.dtype == torch.int32
    assert got.values.dtype == dtype and got.l0.dtype == dtype
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, msg=name)


def test_reference_lists_every_latent_above_threshold_when_uncapped():
    data = exact_sae_data(9, 20, 31, dtype=torch.float64, seed=3)
    threshold = _threshold(31, seed=4, dtype=torch.float64)
    out = _run("torch", data, threshold, 31)
    z = preactivations(data["x"], data["W_enc"], data["b_enc"], data["b_dec"])
    dense = torch.where(z > threshold, z, 0)
    scattered = torch.zeros_like(dense).scatter_add_(1, out.indices.long(), out.values)
    torch.testing.assert_close(scattered, dense, rtol=0, atol=0)
    assert out.counts.tolist() == (z > threshold).sum(1).tolist()
    assert out.truncated_rows.item() == 0


@pytest.mark.parametrize("backend,device", PAIRS)
def test_truncated_rows_counts_rows_over_the_cap(backend, device):
    data = exact_sae_data(17, 12, 40, device=device, seed=5)
    threshold = torch.zeros(40, device=device)
    z = preactivations(data["x"], data["W_enc"], data["b_enc"], data["b_dec"])
    out = _run(backend, data, threshold, 6)
    assert out.truncated_rows.item() == int(((z > 0).sum(1) > 6).sum())
    assert out.counts.tolist() == (z > 0).sum(1).clamp(max=6).tolist()


@pytest.mark.parametrize("backend,device", PAIRS + [("torch", "cpu")])
def test_listed_latents_come_in_ascending_index_before_the_padding(backend, device):
    data = exact_sae_data(9, 16, 70, device=device, seed=11)
    threshold = _threshold(70, seed=12, device=device)
    out = _run(backend, data, threshold, 20, bandwidth=0.5)
    z = preactivations(data["x"], data["W_enc"], data["b_enc"], data["b_dec"])
    listed = (z > threshold - 0.25).sum(1).clamp(max=20)
    assert 0 < listed.min() and listed.max() == 20, "the data must give short and full rows"
    for indices, values, n in zip(out.indices.cpu(), out.values.cpu(), listed.tolist()):
        assert (indices[:n].diff() > 0).all(), indices
        assert indices[n:].eq(0).all() and values[n:].eq(0).all()


@pytest.mark.parametrize("backend,device,dtype", _runnable(PAIRS + [("torch", "cpu")], [torch.float32, torch.float64]))
@pytest.mark.parametrize("cap", [1, 5, 40])
def test_rows_far_over_the_cap_keep_their_largest_shifted_preactivations(backend, device, dtype, cap):
    # Every latent above the threshold, many times the cpu kernel's list buffer: rows are cut back and
    # their floor raised again and again; the small-integer data makes ties common.
    n, m, bandwidth = 7, 300, 0.5
    data = exact_sae_data(n, 10, m, device=device, dtype=dtype, seed=13)
    threshold = torch.full((m,), -0.75, device=device, dtype=dtype)
    out = _run(backend, data, threshold, cap, bandwidth=bandwidth)
    want = _run("torch", data, threshold, cap, bandwidth=bandwidth)
    for name in out._fields:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=0, atol=0, msg=name)
    z = preactivations(data["x"], data["W_enc"], data["b_enc"], data["b_dec"]).cpu()
    shifted = z - (-0.75 - bandwidth / 2)
    assert (shifted > 0).sum(1).min() > cap + max(cap, 32) and out.truncated_rows.item() == n
    kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, out.indices.long().cpu(), True)
    for row in range(n):
        assert kept[row].sum() == cap
        assert shifted[row][kept[row]].min() >= shifted[row][~kept[row]].max()
        # A tie at the cut goes to the lower index.
        cut = shifted[row][kept[row]].min()
        tied = (shifted[row] == cut).nonzero().flatten()
        assert not (kept[row][tied][1:] & ~kept[row][tied][:-1]).any(), "a kept tie after a dropped one"


def _random_problem(device, seed=0, n=11, d=9, m=23, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n, d), (m, d), (m,), (d,))]
    threshold = torch.rand(m, generator=g, dtype=torch.float64) * 0.5 + 0.1
    return [t.to(device=device, dtype=dtype) for t in tensors + [threshold]]


@pytest.mark.parametrize("backend,device,dtype", _runnable(PAIRS, [torch.float64, torch.float32]))
def test_backward_matches_reference(backend, device, dtype):
    inputs = _random_problem(device, dtype=dtype)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4

    def grads(b):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x, W, b_enc, b_dec, theta = leaves
        out = pyinterp.threshold_encode(x, W, b_enc, theta, 12, b_dec=b_dec, bandwidth=0.7, backend=b)
        g = torch.Generator().manual_seed(1)
        weight = torch.randn(out.values.shape, generator=g, dtype=torch.float64).to(device, dtype)
        ((out.values * weight).sum() + 0.3 * out.l0.sum()).backward()
        return out, [t.grad for t in leaves]

    (got_out, got_grads), (want_out, want_grads) = grads(backend), grads("torch")
    for name in got_out._fields:
        torch.testing.assert_close(getattr(got_out, name), getattr(want_out, name), rtol=tolerance,
                                   atol=tolerance, msg=name)
    assert want_out.truncated_rows > 0, "the cap must cut some rows"
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec", "threshold"), got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)


def test_straight_through_gradient_has_the_rectangle_kernel_closed_form():
    # d/dtheta_i of sum f + c * l0 = sum_n -(theta_i + c) / eps * 1[|z_ni - theta_i| < eps / 2]
    x, W, b_enc, b_dec, theta = _random_problem("cpu", seed=2)
    eps, c = 0.6, 0.25
    theta = theta.clone().requires_grad_()
    out = pyinterp.threshold_encode(x, W, b_enc, theta, W.shape[0], b_dec=b_dec, bandwidth=eps, backend="torch")
    (out.values.sum() + c * out.l0.sum()).backward()
    z = preactivations(x, W, b_enc, b_dec)
    band = ((z - theta.detach()).abs() < eps / 2).to(z.dtype)
    expected = (-(theta.detach() + c) / eps * band).sum(0)
    assert band.sum() > 0, "the data must put some pre-activations in the band"
    torch.testing.assert_close(theta.grad, expected, rtol=1e-12, atol=1e-12)


def test_l0_gradient_is_the_derivative_of_the_kernel_smoothed_step():
    # With a rectangle kernel, the STE of 1[z > theta] is the exact derivative in theta of the
    # smoothed step clamp((z - theta) / eps + 1/2, 0, 1): checked by central differences.
    x, W, b_enc, b_dec, theta = _random_problem("cpu", seed=6)
    eps = 0.8
    z = preactivations(x, W, b_enc, b_dec)
    theta_leaf = theta.clone().requires_grad_()
    out = pyinterp.threshold_encode(x, W, b_enc, theta_leaf, W.shape[0], b_dec=b_dec, bandwidth=eps,
                                    backend="torch")
    out.l0.sum().backward()

    def smoothed(t):
        return ((z - t) / eps + 0.5).clamp(0, 1).sum()

    h = 1e-6
    numeric = torch.stack([(smoothed(theta + h * e) - smoothed(theta - h * e)) / (2 * h)
                           for e in torch.eye(theta.shape[0], dtype=torch.float64)])
    torch.testing.assert_close(theta_leaf.grad, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device,_", _runnable(PAIRS + [("torch", "cpu")], [torch.float64]))
def test_gradcheck_float64_away_from_the_jump(backend, device, _):
    # Away from z = theta (margin >> the finite-difference step) f is smooth in x, W_enc, b_enc, b_dec.
    x, W, b_enc, b_dec, _ = _random_problem(device, seed=8, n=4, d=5, m=9)
    z = preactivations(x, W, b_enc, b_dec)
    ordered = z.sort(0).values
    threshold = (ordered[1] + ordered[2]) / 2  # half the tokens active per latent, midway between two
    assert ((z - threshold).abs() > 1e-3).all()

    def f(x, W, b_enc, b_dec):
        return pyinterp.threshold_encode(x, W, b_enc, threshold, 9, b_dec=b_dec, backend=backend).values

    leaves = [t.clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_empty_batch_gives_empty_outputs_and_zero_gradients(backend, device):
    x = torch.zeros(0, 6, device=device, requires_grad=True)
    W = torch.randn(8, 6, device=device, requires_grad=True)
    theta = torch.rand(8, device=device, requires_grad=True)
    out = pyinterp.threshold_encode(x, W, None, theta, 3, bandwidth=0.1, backend=backend)
    assert out.values.shape == (0, 3) and out.counts.shape == (0,) and out.truncated_rows.item() == 0
    (out.values.sum() + out.l0.sum()).backward()
    assert W.grad.eq(0).all() and theta.grad.eq(0).all()


def test_bad_input_names_the_argument():
    x, W, theta = torch.randn(3, 4), torch.randn(6, 4), torch.rand(6)
    with pytest.raises(ValueError, match="threshold"):
        pyinterp.threshold_encode(x, W, None, torch.rand(5), 2)
    with pytest.raises(ValueError, match="threshold"):
        pyinterp.threshold_encode(x, W, None, torch.rand(6, 1), 2)
    with pytest.raises(ValueError, match="bandwidth"):
        pyinterp.threshold_encode(x, W, None, theta, 2, bandwidth=-0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        pyinterp.threshold_encode(x, W, None, theta.requires_grad_(), 2)
    with pytest.raises(ValueError, match="max_active"):
        pyinterp.threshold_encode(x, W, None, theta.detach(), 7)
