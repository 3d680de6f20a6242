"""topk_encode: every backend against the reference (the spec), forward and backward."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyinterp
from pyinterp.reference import topk_encode as reference
from helpers import (ALL_DTYPES, assert_close_to_float64, backend_device_pairs, exact_like,
                     exact_sae_data)

PAIRS = backend_device_pairs("topk_encode")
# (N, D, M, k): N = 1, k = 1, k = M, D not a power of two, M not a multiple of 8.
SHAPES = [(1, 7, 5, 1), (1, 7, 5, 5), (13, 33, 67, 4), (6, 100, 203, 16)]


def _run(backend, device, data, k, **kwargs):
    return pyinterp.topk_encode(data["x"], data["W_enc"], data["b_enc"], k, b_dec=data["b_dec"],
                                backend=backend, **kwargs)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_exact_data_matches_reference_bitwise(backend, device, dtype, shape):
    n, d, m, k = shape
    data = exact_sae_data(n, d, m, dtype=dtype, device=device, seed=sum(shape))
    values, indices = _run(backend, device, data, k)
    ref_values, ref_indices = _run("torch", device, data, k)
    assert indices.dtype == torch.int32 and values.dtype == dtype
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_ties_go_to_the_lower_index_in_descending_order(backend, device):
    # Every latent has the same pre-activation: the top-k must be latents 0..k-1 in order.
    x = torch.ones(3, 8, device=device)
    W_enc = torch.ones(11, 8, device=device) / 4
    values, indices = pyinterp.topk_encode(x, W_enc, None, 5, backend=backend)
    assert indices.tolist() == [[0, 1, 2, 3, 4]] * 3
    assert values.eq(2.0).all()


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_forward_random_data_within_dtype_tolerance(backend, device, dtype):
    g = torch.Generator().manual_seed(1)
    x64, W64, b64 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((9, 45), (130, 45), (130,)))
    x, W, b = (t.to(device=device, dtype=dtype) for t in (x64, W64, b64))
    values, indices = pyinterp.topk_encode(x, W, b, 8, backend=backend)
    ref_lowp, _ = pyinterp.topk_encode(x, W, b, 8, backend="torch")
    ref64, _ = pyinterp.topk_encode(x.double(), W.double(), b.double(), 8, backend="torch")
    assert_close_to_float64(values, ref_lowp, ref64, "values")
    # The chosen latents' exact pre-activations must be the exact top-k (any swap is a near-tie).
    z = reference.preactivations(x.double(), W.double(), b.double(), None)
    chosen = z.gather(1, indices.long().cpu() if z.device.type == "cpu" else indices.long())
    top, _ = reference.topk_lower_index_ties(z, 8)
    torch.testing.assert_close(chosen, top, atol=1e-4, rtol=0)


# Quiet NaN bit patterns with the sign bit set (negation of a NaN does not flip it for every dtype).
_NEGATIVE_NAN_BITS = {torch.float32: (torch.int32, -0x400000), torch.float16: (torch.int16, -0x200),
                      torch.bfloat16: (torch.int16, -0x40)}


def _nan(dtype, negative):
    if not negative:
        return torch.tensor(float("nan"), dtype=dtype)
    int_dtype, bits = _NEGATIVE_NAN_BITS[dtype]
    nan = torch.tensor(bits, dtype=int_dtype).view(dtype)
    assert bool(torch.isnan(nan)) and bool(torch.signbit(nan))
    return nan


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nan_of_either_sign_ranks_first_and_stays_nan(backend, device, dtype):
    # The reference's rule: NaN ranks above everything (lower index first among NaNs), value NaN.
    n, d, m, k, k_aux = 4, 8, 40, 6, 3
    data = exact_sae_data(n, d, m, dtype=dtype, seed=3)
    data["b_enc"][[5, 17]] = _nan(dtype, False)
    data["b_enc"][[9, 30]] = _nan(dtype, True)
    data["x"][1, 3] = _nan(dtype, True)  # a whole row of NaN pre-activations
    data["x"][2, 0] = _nan(dtype, False)
    data = {name: t.to(device) for name, t in data.items()}
    dead = torch.zeros(m, dtype=torch.bool)
    dead[[9, 12, 13, 30]] = True
    dead = dead.to(device)
    outputs = _run(backend, device, data, k, dead_mask=dead, k_aux=k_aux)
    expected = _run("torch", device, data, k, dead_mask=dead, k_aux=k_aux)
    assert expected[1][0, :4].tolist() == [5, 9, 17, 30]  # the test's premise
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_bf16_x_minus_b_dec_is_not_rounded_before_the_product(backend, device):
    # x - b_dec = 0.375 - 100.5 = -100.125 is exact in fp32 (as in the reference) but rounds to -100
    # in bf16; latent 0 (z = 100.125) then loses to latent 1 (z = 100.0625).
    x = torch.tensor([[0.375, 2.0]], dtype=torch.bfloat16, device=device)
    b_dec = torch.tensor([100.5, 1.0], dtype=torch.bfloat16, device=device)
    W_enc = torch.tensor([[-1.0, 0.0], [0.0, 100.0]], dtype=torch.bfloat16, device=device)
    b_enc = torch.tensor([0.0, 0.0625], dtype=torch.bfloat16, device=device)
    _, indices = pyinterp.topk_encode(x, W_enc, b_enc, 1, b_dec=b_dec, backend=backend)
    assert indices.tolist() == [[0]]


@pytest.mark.parametrize("backend,device", PAIRS)
def test_bf16_realistic_large_b_dec_within_tolerance(backend, device):
    # |b_dec| ~ 100, |x - b_dec| ~ 1, and features far from b_dec (x ~ 1 where b_dec ~ 100).
    g = torch.Generator().manual_seed(11)
    n, d, m, k = 24, 96, 160, 8
    b_dec = 100 * torch.randn(d, generator=g, dtype=torch.float64)
    x = b_dec + torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, ::3] = torch.randn(n, (d + 2) // 3, generator=g, dtype=torch.float64)
    W = torch.randn(m, d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x, W, b, b_dec = (t.to(device=device, dtype=torch.bfloat16) for t in (x, W, b, b_dec))
    values, indices = pyinterp.topk_encode(x, W, b, k, b_dec=b_dec, backend=backend)
    z = reference.preactivations(x.double(), W.double(), b.double(), b_dec.double())
    chosen = z.gather(1, indices.long())
    top, _ = reference.topk_lower_index_ties(z, k)
    # fp32 sums of |x - b_dec| |W| ~ 100 terms err ~1e-5 (x - b_dec rounded to bf16: ~0.1)
    torch.testing.assert_close(chosen, top, atol=1e-3, rtol=0)
    # values: the exact z rounded once to bf16, within one bf16 ulp (2^-7 relative)
    torch.testing.assert_close(values.double(), torch.relu(chosen), atol=0, rtol=2 ** -7)


@pytest.mark.parametrize("m", [4099, 2053, 1001, 100])
def test_cpu_duplicate_latents_tie_in_every_tile(m):
    # Identical encoder rows (as right after resampling dead latents): every latent has the same z,
    # so the top-k must be 0..k-1 whatever tile (full or tail) a latent falls in.
    if "cpu" not in [b for b, dev in PAIRS if dev == "cpu"]:
        pytest.skip("the cpu backend is not built")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 384, generator=g)
    W_enc = torch.randn(1, 384, generator=g).expand(m, 384).contiguous()
    _, indices = pyinterp.topk_encode(x, W_enc, None, 5, backend="cpu")
    assert indices.tolist() == [[0, 1, 2, 3, 4]] * 3

@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("num_dead", [0, 3, 40])
def test_aux_topk_over_dead_latents_matches_reference(backend, device, num_dead):
    # num_dead = 3 < k_aux: the rest are filled by the lowest-index live latents with value 0.
    n, d, m, k, k_aux = 10, 33, 67, 4, 6
    data = exact_sae_data(n, d, m, device=device, seed=num_dead)
    g = torch.Generator().manual_seed(num_dead)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=g)[:num_dead]] = True
    dead = dead.to(device)
    outputs = _run(backend, device, data, k, dead_mask=dead, k_aux=k_aux)
    expected = _run("torch", device, data, k, dead_mask=dead, k_aux=k_aux)
    assert len(outputs) == 4
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    aux_values, aux_indices = outputs[2:]
    assert dead[aux_indices.long()][aux_values > 0].all(), "positive aux activations must be dead latents"


def _loss_and_grads(backend, data, k, grads_out, dead=None, k_aux=0):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in data.items() if t is not None}
    outputs = pyinterp.topk_encode(leaves["x"], leaves["W_enc"], leaves.get("b_enc"), k,
                                   b_dec=leaves.get("b_dec"), dead_mask=dead, k_aux=k_aux, backend=backend)
    loss = (outputs[0].double() * grads_out[0]).sum()
    if k_aux:
        loss = loss + (outputs[2].double() * grads_out[1]).sum()
    loss.backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 7, 5, 5), (13, 33, 67, 4)])
def test_backward_matches_float64_reference(backend, device, dtype, shape):
    n, d, m, k = shape
    data = exact_sae_data(n, d, m, dtype=dtype, device=device, seed=7)
    dead = (torch.arange(m, device=device) % 3 == 0)
    k_aux = min(3, m)
    grads_out = (exact_like((n, k), seed=1, device=device).double(),
                 exact_like((n, k_aux), seed=2, device=device).double())
    got = _loss_and_grads(backend, data, k, grads_out, dead, k_aux)
    ref_lowp = _loss_and_grads("torch", data, k, grads_out, dead, k_aux)
    data64 = {name: t.double() if t is not None else None for name, t in data.items()}
    ref64 = _loss_and_grads("torch", data64, k, grads_out, dead, k_aux)
    for name in got:
        assert_close_to_float64(got[name], ref_lowp[name], ref64[name], f"grad {name}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_relu_mask_blocks_gradient_when_fewer_than_k_are_positive(backend, device):
    # Only latents 0 and 1 have positive pre-activations, but k = 4 latents are selected:
    # the other two are selected with negative z and must receive no gradient (docs/sae.md, "Traps", 1).
    d, m, k = 6, 9, 4
    x = torch.ones(1, d, device=device)
    W_enc = -torch.ones(m, d, device=device) * torch.arange(1, m + 1, device=device)[:, None] / 8
    W_enc[:2] = 0.5
    leaves = [t.clone().requires_grad_() for t in (x, W_enc)]
    b_enc = torch.zeros(m, device=device, requires_grad=True)
    values, indices = pyinterp.topk_encode(leaves[0], leaves[1], b_enc, k, backend=backend)
    assert values[0, 2:].eq(0).all() and indices[0, :2].tolist() == [0, 1]
    values.sum().backward()
    selected_negative = indices[0, 2:].long()
    assert leaves[1].grad[selected_negative].eq(0).all()
    assert b_enc.grad[selected_negative].eq(0).all()
    assert b_enc.grad[:2].eq(1).all()


@pytest.mark.parametrize("backend,device", PAIRS)
def test_aux_gradient_reaches_encoder(backend, device):
    data = exact_sae_data(8, 12, 30, device=device, seed=3)
    dead = torch.zeros(30, dtype=torch.bool, device=device)
    dead[20:] = True
    W_enc = data["W_enc"].clone().requires_grad_()
    b_enc = data["b_enc"].clone().requires_grad_()
    outputs = pyinterp.topk_encode(data["x"], W_enc, b_enc, 3, dead_mask=dead, k_aux=4, backend=backend)
    aux_values, aux_indices = outputs[2:]
    aux_values.sum().backward()  # a loss on the aux activations alone (docs/sae.md, "Traps", 2)
    fired = aux_indices[aux_values > 0].long().unique()
    assert fired.numel() > 0
    assert W_enc.grad[fired].abs().sum(1).gt(0).all()
    assert b_enc.grad[fired].gt(0).all()
    assert W_enc.grad[:20].eq(0).all(), "live latents get no gradient from the aux loss"


@pytest.mark.parametrize("backend,device", PAIRS)
def test_weight_gradients_are_bitwise_deterministic(backend, device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 24, generator=g).to(device)
    W = torch.randn(50, 24, generator=g).to(device)  # 50 latents, 40 x 8 picks: many repeats
    runs = []
    for _ in range(2):
        W_enc = W.clone().requires_grad_()
        values, _ = pyinterp.topk_encode(x, W_enc, None, 8, backend=backend)
        (values * torch.linspace(-1, 1, 8, device=device)).sum().backward()
        runs.append(W_enc.grad)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_three_dimensional_input_keeps_leading_shape(backend, device):
    data = exact_sae_data(6, 33, 40, device=device, seed=11)
    x3 = data["x"].reshape(2, 3, 33)
    values, indices = pyinterp.topk_encode(x3, data["W_enc"], data["b_enc"], 5, b_dec=data["b_dec"],
                                           backend=backend)
    flat_values, flat_indices = _run("torch", device, data, 5)
    assert values.shape == (2, 3, 5) and indices.shape == (2, 3, 5)
    assert torch.equal(values.reshape(6, 5), flat_values) and torch.equal(indices.reshape(6, 5), flat_indices)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_opcheck(backend, device):
    data = exact_sae_data(4, 9, 13, device=device, seed=2)
    dead = torch.arange(13, device=device) >= 9
    args = (data["x"], data["W_enc"], data["b_enc"], data["b_dec"], 3, dead, 2, backend)
    torch.library.opcheck(torch.ops.pyinterp.topk_encode.default, args)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
               for s in ((3, 5), (11, 5), (11,), (5,))]
    dead = torch.arange(11) % 2 == 0
    for backend in ("cpu", "torch"):
        def fn(x, W_enc, b_enc, b_dec):
            out = pyinterp.topk_encode(x, W_enc, b_enc, 3, b_dec=b_dec, dead_mask=dead, k_aux=2,
                                       backend=backend)
            return out[0], out[2]
        assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_compiles_with_fullgraph(backend, device):
    data = exact_sae_data(5, 9, 14, device=device, seed=4)

    def step(x, W_enc, b_enc, b_dec):
        values, indices = pyinterp.topk_encode(x, W_enc, b_enc, 3, b_dec=b_dec, backend=backend)
        return values.sum() + indices.sum()

    W_enc = data["W_enc"].clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(data["x"], W_enc, data["b_enc"], data["b_dec"])
    loss.backward()
    expected = step(data["x"], data["W_enc"], data["b_enc"], data["b_dec"])
    assert torch.equal(loss.detach(), expected) and W_enc.grad is not None


def _power_of_two_scale(m, seed):
    g = torch.Generator().manual_seed(seed)
    return 2.0 ** torch.randint(-2, 3, (m,), generator=g).to(torch.float64)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("scaled_values", [True, False])
def test_scale_before_selection_matches_reference_bitwise(backend, device, scaled_values):
    # Powers of two keep s_i * z_i exact, so folding s into W_enc and b_enc must agree bit for bit.
    n, d, m, k = 9, 12, 40, 5
    data = exact_sae_data(n, d, m, device=device, seed=3)
    scale = _power_of_two_scale(m, 4).to(device=device, dtype=torch.float32)
    dead = (torch.arange(m, device=device) % 3 == 0)
    got = _run(backend, device, data, k, scale=scale, scaled_values=scaled_values, dead_mask=dead, k_aux=4)
    want = _run("torch", device, data, k, scale=scale, scaled_values=scaled_values, dead_mask=dead, k_aux=4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_scale_changes_the_selection():
    # Latent 1 has the larger z; scaling latent 0 by 4 makes it win the single slot.
    x = torch.tensor([[1.0]])
    W_enc = torch.tensor([[1.0], [2.0]])
    values, indices = pyinterp.topk_encode(x, W_enc, None, 1, scale=torch.tensor([4.0, 1.0]),
                                           backend="torch")
    assert indices.tolist() == [[0]] and values.tolist() == [[4.0]]
    values, _ = pyinterp.topk_encode(x, W_enc, None, 1, scale=torch.tensor([4.0, 1.0]), scaled_values=False)
    assert values.tolist() == [[1.0]]


@pytest.mark.parametrize("backend", [b for b, dev in PAIRS if dev == "cpu" and b != "triton"])
def test_scale_gradients_match_float64_reference(backend):  # the Triton encoder has no float64 path
    n, d, m, k = 7, 10, 30, 4
    data = exact_sae_data(n, d, m, dtype=torch.float64, seed=5)
    scale = (torch.rand(m, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5)

    def grads(run_backend):
        leaves = {name: data[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
        leaves["scale"] = scale.clone().requires_grad_()
        values, _ = pyinterp.topk_encode(leaves["x"], leaves["W_enc"], leaves["b_enc"], k,
                                         b_dec=leaves["b_dec"], scale=leaves["scale"], backend=run_backend)
        (values * torch.arange(1.0, k + 1, dtype=torch.float64)).sum().backward()
        return {name: leaf.grad for name, leaf in leaves.items()}

    got, want = grads(backend), grads("torch")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=name)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 40), m=st.integers(1, 70), data=st.data())
def test_hypothesis_shapes_match_reference(n, d, m, data):
    k = data.draw(st.integers(1, m))
    backend = data.draw(st.sampled_from([b for b, dev in PAIRS if dev == "cpu"] or ["torch"]))
    tensors = exact_sae_data(n, d, m, seed=n * 1000 + d * 10 + m)
    got = _run(backend, "cpu", tensors, k)
    want = _run("torch", "cpu", tensors, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class TestBadInput:
    data = exact_sae_data(4, 6, 10)

    def call(self, **overrides):
        args = dict(x=self.data["x"], W_enc=self.data["W_enc"], b_enc=self.data["b_enc"], k=3)
        args.update(overrides)
        return pyinterp.topk_encode(args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), args.pop("k"), **args)

    @pytest.mark.parametrize("k", [0, -1, 11])
    def test_k_out_of_range(self, k):
        with pytest.raises(ValueError, match="k must be in"):
            self.call(k=k)

    def test_width_mismatch(self):
        with pytest.raises(ValueError, match="W_enc"):
            self.call(x=torch.zeros(4, 7))

    def test_bias_shapes(self):
        with pytest.raises(ValueError, match="b_enc"):
            self.call(b_enc=torch.zeros(9))
        with pytest.raises(ValueError, match="b_dec"):
            self.call(b_dec=torch.zeros(5))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="W_enc"):
            self.call(W_enc=self.data["W_enc"].half())

    def test_integer_input(self):
        with pytest.raises(TypeError, match="x must have dtype"):
            self.call(x=torch.zeros(4, 6, dtype=torch.int64))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="W_enc is on meta"):
            self.call(W_enc=self.data["W_enc"].to("meta"))

    @pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu"] + ["torch"])
    def test_empty_batch_gives_empty_outputs_and_gradients(self, backend):
        x = torch.zeros(0, 6, requires_grad=True)
        W_enc = self.data["W_enc"].clone().requires_grad_()
        values, indices, aux_values, aux_indices = self.call(
            x=x, W_enc=W_enc, dead_mask=torch.ones(10, dtype=torch.bool), k_aux=2, backend=backend)
        assert values.shape == indices.shape == (0, 3) and aux_values.shape == aux_indices.shape == (0, 2)
        assert indices.dtype == aux_indices.dtype == torch.int32
        (values.sum() + aux_values.sum()).backward()
        assert x.grad.shape == (0, 6) and torch.equal(W_enc.grad, torch.zeros_like(W_enc))

    def test_no_features(self):
        with pytest.raises(ValueError, match="W_enc must be"):
            self.call(x=torch.zeros(4, 0), W_enc=torch.zeros(10, 0), b_enc=None)

    @pytest.mark.parametrize("name", ["b_enc", "b_dec", "dead_mask", "scale"])
    def test_optional_arguments_that_are_not_tensors(self, name):
        import numpy as np

        for bad in ([0.0] * 10, np.zeros(10, dtype=np.float32)):
            with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
                self.call(**{name: bad})

    @pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
    def test_scale_must_be_positive_and_finite(self, bad):
        scale = torch.ones(10)
        scale[3] = bad
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            self.call(scale=scale)

    def test_aux_needs_dead_mask_of_the_right_kind(self):
        with pytest.raises(ValueError, match="dead_mask"):
            self.call(k_aux=2)
        with pytest.raises(TypeError, match="dead_mask"):
            self.call(dead_mask=torch.zeros(10), k_aux=2)
        with pytest.raises(ValueError, match="dead_mask"):
            self.call(dead_mask=torch.zeros(9, dtype=torch.bool), k_aux=2)

    def test_unknown_or_unavailable_backend(self):
        with pytest.raises(RuntimeError, match="unknown backend"):
            self.call(backend="fast")
        with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors"):
            self.call(backend="cuda")


def test_triton_gpu_predicate_routes_large_k_aux_elsewhere(monkeypatch):
    # k_aux in (256, 512] (K_aux = 512) with one row block (16 rows) on a 132-SM GPU: 64 splits x 512 = 2^15 keys
    # per row in one finalize program, over a GPU block's shared memory. Checked without a GPU: the
    # predicate reads the SM count through _sm_count.
    pytest.importorskip("triton")
    from pyinterp import _dispatch
    from pyinterp.ops.topk_encode import SPEC

    kernels = _dispatch.triton_kernels("topk_encode")
    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    request = dict(tensors_on=cuda, rows=16, latents=16384, k=32, k_aux=384)
    assert kernels.finalize_keys(16, 16384, 32, 384, 132)[1] >= kernels.MAX_FINALIZE_KEYS
    with pytest.raises(ValueError, match="k_aux=384"):
        SPEC.resolve("triton", cuda, **request)
    assert SPEC.resolve("auto", cuda, **request) != "triton"
    assert SPEC.resolve("triton", cuda, **dict(request, k_aux=256)) == "triton"
    if _dispatch.triton_interpreting():  # the interpreter has no shared-memory bound
        cpu = torch.device("cpu")
        assert SPEC.resolve("triton", cpu, **dict(request, tensors_on=cpu)) == "triton"


@pytest.mark.parametrize("k,k_aux", [(32, 0), (40, 0), (8, 20)])
def test_triton_gpu_configs_match_reference_under_the_interpreter(k, k_aux):
    # The GPU tile sizes (gpu_config's three branches: no aux with K <= 32, larger K, aux) are never
    # launched by the interpreter's own default_config; run each here on exact data.
    pytest.importorskip("triton")
    from pyinterp import _dispatch
    if not _dispatch.triton_interpreting():
        pytest.skip("needs the Triton interpreter")
    kernels = _dispatch.triton_kernels("topk_encode")
    n, d, m = 70, 40, 520  # 9 tiles of 64: two splits
    K, KA = kernels.pow2(k), kernels.pow2(k_aux) if k_aux else 0
    config = kernels.gpu_config(n, m, K, KA, sms=132)
    assert config.block_m == 64 and config.splits > 1  # several splits: the merge path runs too
    data = exact_sae_data(n, d, m, device="cpu", seed=k)
    dead = torch.arange(m) % 3 == 0
    got = kernels.topk_encode_forward(data["x"], data["W_enc"], data["b_enc"], data["b_dec"], k,
                                      dead, k_aux, config=config)
    want = _run("torch", "cpu", data, k, dead_mask=dead if k_aux else None, k_aux=k_aux)
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t.to(want_t.dtype), want_t, rtol=0, atol=0)
