"""pyinterp.nn.MatchingPursuitSAE: losses and gradients agree across backends, the Gram-matrix cache
follows the decoder, save/load (pyinterp's folder and SAELens'), and the trainer trains it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import pyinterp
from pyinterp.nn import MatchingPursuitSAE
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae
from helpers import backends
from sae_helpers import correlated_activations


def _sae(backend, **kwargs):
    return MatchingPursuitSAE(10, 30, 5, backend=backend, dtype=torch.float64, seed=2, **kwargs)


def _batch():
    return torch.randn(25, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5


@pytest.mark.parametrize("positive", [True, False])
def test_losses_and_gradients_agree_across_backends(positive):
    x = _batch()
    results = {}
    for backend in backends("matching_pursuit_encode"):
        sae = _sae(backend, positive=positive)
        sae.init_b_dec(x)
        out = sae(x)
        out.loss.backward()
        results[backend] = (out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    reference_loss, reference_grads = results.pop("torch")
    assert set(reference_grads) == {"W_dec", "b_dec"}
    for backend, (loss, grads) in results.items():
        torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=1e-12, msg=backend)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-10, atol=1e-10, msg=f"{backend} {name}")


def test_gram_cache_follows_the_decoder():
    x = _batch()
    sae = _sae("cpu", use_gram=True)
    first = sae.encode(x)
    with torch.no_grad():
        sae.W_dec.copy_(sae.W_dec.roll(1, 0))  # in place: a stale Gram matrix would update the wrong rows
    rolled = sae.encode(x)
    fresh = pyinterp.matching_pursuit_encode(x, sae.W_dec.detach(), 5, b_dec=sae.b_dec.detach(), positive=True,
                                             backend="torch")
    assert torch.equal(rolled[1], fresh.indices)
    assert not torch.equal(first[1], rolled[1])


def test_save_load_round_trip(tmp_path):
    sae = _sae("auto", residual_threshold=0.3, stop_on_duplicate_support=True, positive=False)
    sae.save(tmp_path)
    loaded = MatchingPursuitSAE.load(tmp_path, backend="torch")
    assert loaded.config() == sae.config()
    assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.b_dec, sae.b_dec)
    x = _batch()
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)


def test_loads_saelens_folder_and_gives_its_numbers(tmp_path):
    saelens = pytest.importorskip("sae_lens.saes.matching_pursuit_sae")
    theirs = saelens.MatchingPursuitSAE(saelens.MatchingPursuitSAEConfig(
        d_in=10, d_sae=30, residual_threshold=0.5, max_iterations=6, dtype="float64"))
    with torch.no_grad():
        W = torch.randn(30, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        theirs.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        theirs.b_dec.copy_(torch.randn(10, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    save_file({"W_dec": theirs.W_dec.detach(), "b_dec": theirs.b_dec.detach()},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(theirs.cfg.to_dict(), default=str))
    ours = MatchingPursuitSAE.load(tmp_path, backend="cpu")
    assert (ours.k, ours.residual_threshold, ours.stop_on_duplicate_support) == (6, 0.5, True)
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).x_hat, theirs(x), rtol=1e-12, atol=1e-12)


def test_load_rejects_other_architectures(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 4}))
    with pytest.raises(ValueError, match="not a matching-pursuit SAE"):
        MatchingPursuitSAE.load(tmp_path)


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="k must be"):
        MatchingPursuitSAE(4, 30, 5)
    with pytest.raises(ValueError, match="k_aux"):
        MatchingPursuitSAE(10, 30, 5, k_aux=4)
    with pytest.raises(ValueError, match="residual_threshold"):
        MatchingPursuitSAE(10, 30, 5, residual_threshold=-1.0)


def test_trainer_trains_it_and_saves_a_loadable_sae(tmp_path):
    sae = build_sae("matching_pursuit", 12, 40, 4, backend="auto", k_aux=None, aux_alpha=1 / 32)
    assert isinstance(sae, MatchingPursuitSAE)
    source = TensorSource(correlated_activations(400, 12, seed=3))
    config = TrainConfig(tokens=32 * 30, batch_size=32, lr=1e-2, log_every=10, progress=False)
    trainer = Trainer(sae, source, config, tmp_path)
    batch = trainer._batch(0, 0)
    sae.init_b_dec(batch)
    first = sae(batch).fvu.item()
    trainer.train()
    assert sae(batch).fvu.item() < first
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    loaded = MatchingPursuitSAE.load(tmp_path, backend="torch")
    assert torch.equal(loaded.W_dec, sae.W_dec)


# The op's host-side code is the same for every backend; the Triton interpreter would take half a minute.
@pytest.mark.parametrize("backend", [b for b in backends("matching_pursuit_encode") if b != "triton"])
def test_training_step_has_no_host_sync(backend):
    from test_sae_training import _HostSyncDetector

    sae = build_sae("matching_pursuit", 12, 40, 4, backend=backend, residual_threshold=0.5,
                    stop_on_duplicate_support=True)
    trainer = Trainer(sae, TensorSource(correlated_activations(200, 12)),
                      TrainConfig(tokens=10**4, batch_size=16, progress=False))
    trainer.train_step()
    with _HostSyncDetector() as detector:
        trainer.train_step()
    assert detector.syncs == []
