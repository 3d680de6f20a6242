"""TopKSAE(multi_topk=True), sparsify's multi-TopK loss: fvu + aux + FVU(top-4k) / 8 from one encode
with k' = 4k, against a dense float64 reference, values and gradients; its save/load flag."""
from __future__ import annotations

import pytest
import torch

from pyinterp.nn import BatchTopKSAE, TopKSAE
from sae_helpers import correlated_activations, training_backends


def _dense_multi_topk_loss(sae, x):
    z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    variance = (x - x.mean(0)).pow(2).sum()

    def fvu(k):
        mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(min(k, sae.n_latents), dim=1).indices, True)
        x_hat = torch.where(mask, z.relu(), 0) @ sae.W_dec + sae.b_dec
        return (x - x_hat).pow(2).sum() / variance

    return fvu(sae.k), fvu(4 * sae.k)


@pytest.mark.parametrize("backend", training_backends())
@pytest.mark.parametrize("n_latents", [40, 10])  # 4k = 12 > 10: the whole dictionary
def test_multi_topk_loss_and_gradients_match_dense_reference(backend, n_latents):
    sae = TopKSAE(12, n_latents, 3, k_aux=0, multi_topk=True, backend=backend, dtype=torch.float64, seed=4)
    x = correlated_activations(25, 12, seed=6).double()
    sae.init_b_dec(x)
    out = sae(x)
    assert out.values.shape == (25, 3) and out.indices.shape == (25, 3)
    out.loss.backward()
    fused = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    fvu, multi_fvu = _dense_multi_topk_loss(sae, x)
    (fvu + multi_fvu / 8).backward()
    torch.testing.assert_close(out.fvu, fvu.detach())
    torch.testing.assert_close(out.multi_topk_fvu, multi_fvu.detach())
    torch.testing.assert_close(out.loss, (fvu + multi_fvu / 8).detach())
    for got, want in zip(fused, (p.grad for p in sae.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    values, indices = sae.encode(x)
    assert torch.equal(values, out.values) and torch.equal(indices, out.indices)


def test_without_multi_topk_the_extra_loss_is_zero_and_off_by_default():
    sae = TopKSAE(12, 40, 3, backend="cpu")
    out = sae(correlated_activations(20, 12))
    assert not sae.multi_topk and out.multi_topk_fvu == 0
    torch.testing.assert_close(out.loss, out.fvu + sae.aux_alpha * out.aux_loss)


def test_flag_is_saved_in_sparsify_config_and_loaded(tmp_path):
    sae = TopKSAE(8, 24, 2, multi_topk=True, backend="cpu")
    sae.save(tmp_path)
    assert sae.sparsify_config()["multi_topk"] is True
    assert TopKSAE.load(tmp_path).multi_topk
    with pytest.raises(ValueError, match="multi_topk is a per-token TopK loss"):
        BatchTopKSAE(8, 24, 2, multi_topk=True)
    with pytest.raises(TypeError, match="multi_topk must be a bool"):
        TopKSAE(8, 24, 2, multi_topk=1)


def test_trainer_builds_it_and_rejects_it_with_latent_sharding():
    from pyinterp.sae import build_sae

    assert build_sae("topk", 8, 24, 2, multi_topk=True).multi_topk
    with pytest.raises(ValueError, match="without multi_topk only"):
        build_sae("topk", 8, 24, 2, parallel="latents", multi_topk=True)
