"""BatchTopKSAE's global threshold: estimated in training (EMA of the smallest kept activation), used
in eval mode through threshold_encode (a variable number of active latents per token)."""
from __future__ import annotations

import pytest
import torch

from pyinterp.nn import BatchTopKSAE
from pyinterp.reference.topk_encode import preactivations
from helpers import backends
from sae_helpers import correlated_activations


def _sae(backend, max_k_per_row=40, dtype=torch.float64):
    sae = BatchTopKSAE(12, 40, 4, max_k_per_row=max_k_per_row, threshold_momentum=0.25, backend=backend,
                       dtype=dtype, seed=2)
    sae.init_b_dec(correlated_activations(30, 12, seed=8).to(dtype))
    return sae


def test_threshold_is_an_ema_of_the_smallest_kept_activation():
    sae = _sae("cpu")
    first = sae(correlated_activations(30, 12, seed=1).double())
    smallest = first.values[first.values > 0].min().float()
    torch.testing.assert_close(sae.threshold, smallest)  # the first batch sets it
    second = sae(correlated_activations(30, 12, seed=2).double())
    torch.testing.assert_close(sae.threshold, torch.lerp(smallest, second.values[second.values > 0].min().float(), 0.25))
    sae.eval()
    before = sae.threshold.clone()
    sae(correlated_activations(30, 12, seed=3).double())
    assert torch.equal(sae.threshold, before)  # eval mode does not move it


@pytest.mark.parametrize("backend", backends("threshold_encode"))
def test_eval_keeps_every_activation_above_the_threshold_train_keeps_k_per_token(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    sae = _sae(backend, dtype=dtype)
    x = correlated_activations(30, 12, seed=4).to(dtype)
    train = sae(x)
    assert int((train.values > 0).sum()) == 4 * 30
    sae.eval()
    with torch.no_grad():
        out = sae(x)
    z = preactivations(x, sae.W_enc, sae.b_enc, sae.b_dec).to(dtype)
    theta = sae.threshold.to(dtype)
    got = torch.zeros_like(z).scatter_add_(1, out.indices.long(), out.values)
    torch.testing.assert_close(got, torch.where(z > theta, z, 0).detach())
    active = (out.values > 0).sum(1)
    assert active.min() != active.max()  # a variable number per token
    assert int(sae.saturated_rows) == 0


def test_eval_counts_tokens_over_the_cap():
    sae = _sae("cpu", max_k_per_row=5)
    x = correlated_activations(30, 12, seed=4).double()
    sae(x)
    sae.eval()
    sae.saturated_rows.zero_()
    with torch.no_grad():
        out = sae(x)
    z = preactivations(x, sae.W_enc, sae.b_enc, sae.b_dec)
    over = ((z > sae.threshold.double()).sum(1) > 5).sum()
    assert over > 0 and int(sae.saturated_rows) == int(over)
    assert out.values.shape == (30, 5)
