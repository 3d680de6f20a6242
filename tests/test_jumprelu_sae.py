"""pyinterp.nn.JumpReLUSAE: its losses and gradients agree across backends, eval mode is the dense
JumpReLU, and a few optimiser steps lower the loss."""
from __future__ import annotations

import pytest
import torch

from pyinterp.nn import JumpReLUSAE
from pyinterp.reference.topk_encode import preactivations
from helpers import backends


def _sae(backend, **kwargs):
    sae = JumpReLUSAE(12, 40, 40, bandwidth=0.2, l0_coefficient=0.05, init_threshold=0.1, backend=backend,
                      dtype=torch.float64, **kwargs)
    return sae


def _batch():
    return torch.randn(30, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_losses_and_gradients_agree_across_backends():
    x = _batch()
    results = {}
    for backend in backends("threshold_encode"):
        if backend == "triton":
            continue  # float64 SAE: the triton encoder takes float32 and below (test_threshold_encode.py)
        sae = _sae(backend)
        sae.init_b_dec(x)
        out = sae(x)
        out.loss.backward()
        results[backend] = (out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    reference_loss, reference_grads = results.pop("torch")
    assert reference_grads["threshold"].abs().sum() > 0, "the STE must reach the thresholds"
    for backend, (loss, grads) in results.items():
        torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=1e-12, msg=backend)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-10, atol=1e-10, msg=f"{backend} {name}")


def test_eval_mode_is_the_dense_jumprelu():
    x = _batch()
    sae = _sae("auto").eval()
    values, indices = sae.encode(x)
    z = preactivations(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())
    dense = torch.where(z > sae.threshold.detach(), z, 0)
    torch.testing.assert_close(torch.zeros_like(dense).scatter_add_(1, indices.long(), values.detach()), dense)


def test_training_steps_lower_the_loss():
    x = _batch()
    sae = _sae("auto")
    sae.init_b_dec(x)
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        optimiser.zero_grad()
        loss = sae(x).loss
        first = loss.item() if first is None else first
        loss.backward()
        optimiser.step()
    assert sae(x).loss.item() < first


def test_trainer_and_cli_build_and_train_a_jumprelu_sae():
    import argparse

    from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae
    from pyinterp.sae.cli import add_arguments, sae_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    jumprelu = ["--architecture", "jumprelu", "--latents", "40", "--k", "4", "--bandwidth", "0.2",
                "--l0-coefficient", "0.05"]
    assert sae_options(parser.parse_args(jumprelu))[0] == 16, "the cap defaults to 4 x --k"
    args = parser.parse_args(jumprelu + ["--max-active", "40"])
    max_active, options = sae_options(args)
    assert max_active == 40 and options == {"bandwidth": 0.2, "l0_coefficient": 0.05}
    sae = build_sae(args.architecture, 12, args.latents, max_active, **options)
    assert isinstance(sae, JumpReLUSAE) and sae.max_active == 40
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(2))
    trainer = Trainer(sae, TensorSource(x), TrainConfig(tokens=128, batch_size=32, lr=1e-2, progress=False))
    before = sae.threshold.detach().clone()
    for _ in range(2):
        trainer.train_step()
    metrics = trainer.collect_metrics(1.0, 2)
    assert metrics["aux_loss"] == pytest.approx(0.05 * metrics["l0"], rel=1e-5)
    assert not torch.equal(sae.threshold.detach(), before), "the trainer must move the thresholds"


@pytest.mark.parametrize("backend", [b for b in backends("threshold_encode") if b != "triton"])
def test_jumprelu_training_step_has_no_host_sync(backend):
    from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae
    from test_sae_training import _HostSyncDetector

    sae = build_sae("jumprelu", 12, 40, 12, backend=backend, bandwidth=0.2, init_threshold=0.1)
    trainer = Trainer(sae, TensorSource(torch.randn(128, 12, generator=torch.Generator().manual_seed(3))),
                      TrainConfig(tokens=4000, batch_size=32, progress=False))
    trainer.train_step()
    with _HostSyncDetector() as detector:
        trainer.train_step()
    assert detector.syncs == []


def test_attribution_codes_keep_latent_zero_beside_the_padding():
    # Padding slots repeat index 0 (value 0): the dense code must still hold latent 0's value.
    from pyinterp.attribution.sae import codes_and_reconstruction

    sae = _sae("cpu")
    with torch.no_grad():
        sae.b_enc[0] = 50.0  # latent 0 active in every row, listed first, padding after it
    x = _batch()
    codes, _ = codes_and_reconstruction(sae, x)
    z = preactivations(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())
    dense = torch.where(z > sae.threshold.detach(), z, 0)
    assert (dense[:, 0] > 0).all() and (dense != 0).sum(1).max() < 40, "rows need padding after latent 0"
    torch.testing.assert_close(codes, dense)


def test_save_and_load_round_trip(tmp_path):
    from pyinterp.nn import TopKSAE

    sae = _sae("cpu")
    with torch.no_grad():
        sae.threshold.uniform_(0.05, 0.3, generator=torch.Generator().manual_seed(4))
    sae.save(tmp_path)
    loaded = TopKSAE.load(tmp_path, backend="cpu")
    assert isinstance(loaded, JumpReLUSAE)
    assert (loaded.bandwidth, loaded.l0_coefficient, loaded.max_active) == (0.2, 0.05, 40)
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    x = _batch()
    torch.testing.assert_close(loaded.eval().encode(x), sae.eval().encode(x), rtol=0, atol=0)


def test_save_load_round_trip_and_refusals(tmp_path):
    import json

    import pytest
    from safetensors.torch import load_file, save_file

    from pyinterp.nn import TopKSAE

    x = _batch()
    sae = _sae("auto", seed=3)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(40, dtype=torch.float64) * 0.3)
        sae.b_enc.normal_(0, 0.1)
    sae.save(tmp_path / "sae")
    loaded = JumpReLUSAE.load(tmp_path / "sae", backend="cpu")
    assert (loaded.max_active, loaded.bandwidth, loaded.l0_coefficient, loaded.seed) == (40, 0.2, 0.05, 3)
    torch.testing.assert_close(loaded.threshold, sae.threshold)
    torch.testing.assert_close(loaded.eval()(x).x_hat, sae.eval()(x).x_hat, rtol=0, atol=0)
    assert isinstance(TopKSAE.load(tmp_path / "sae", backend="cpu"), JumpReLUSAE)
    TopKSAE(12, 40, 4).save(tmp_path / "topk")
    with pytest.raises(ValueError, match="not a JumpReLU SAE"):
        JumpReLUSAE.load(tmp_path / "topk")
    tensors = load_file(tmp_path / "sae" / "sae.safetensors")
    save_file({**tensors, "threshold": tensors["threshold"][:39]}, tmp_path / "sae" / "sae.safetensors")
    with pytest.raises(ValueError, match=r"threshold has shape \(39,\), expected \(40,\)"):
        JumpReLUSAE.load(tmp_path / "sae")
    del tensors["threshold"]
    save_file(tensors, tmp_path / "sae" / "sae.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'threshold'"):
        JumpReLUSAE.load(tmp_path / "sae")
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**config, "k": "many"}))
    with pytest.raises(ValueError, match="integer 'k'"):
        JumpReLUSAE.load(tmp_path / "sae")
