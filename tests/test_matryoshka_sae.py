"""MatryoshkaBatchTopKSAE: the single-decode prefix losses equal per-prefix dense decodes (values and
gradients), bad prefixes are rejected naming the argument, save/load, and trainer / CLI support."""
from __future__ import annotations

import argparse

import pytest
import torch

from pyinterp.nn import MatryoshkaBatchTopKSAE, TopKSAE
from pyinterp.nn.matryoshka import default_prefixes
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae
from helpers import backends
from sae_helpers import correlated_activations

# The fused path of the module: prefix_decode's kernels (the Triton encoder has no float64 path).
BACKENDS = [b for b in backends("prefix_decode") if b != "triton"]


def _dense_prefix_loss(sae, x, values, indices):
    """Per-prefix FVUs from dense decodes: the dense code truncated to each prefix, times W_dec."""
    dense = torch.zeros(x.shape[0], sae.n_latents, dtype=x.dtype).scatter_add(1, indices.long(), values)
    variance = (x - x.mean(0)).pow(2).sum()
    fvus = torch.stack([(x - (dense[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum() / variance
                        for m in sae.prefixes])
    return fvus, (torch.tensor(sae.prefix_weights, dtype=x.dtype) * fvus).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [None, [0.5, 0.0, 2.0, 1.0]])
def test_single_decode_losses_and_gradients_equal_per_prefix_dense_decodes(backend, weights):
    sae = MatryoshkaBatchTopKSAE(10, 37, 3, prefixes=[2, 9, 20, 37], prefix_weights=weights, k_aux=0,
                                 backend=backend, dtype=torch.float64, seed=1)
    x = correlated_activations(23, 10, seed=3).double()
    sae.init_b_dec(x)
    out = sae(x)
    out.loss.backward()
    fused = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    dense_fvus, dense_loss = _dense_prefix_loss(sae, x, out.values, out.indices)
    torch.testing.assert_close(out.prefix_fvu, dense_fvus.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, dense_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.fvu, dense_fvus[-1].detach())
    # The selection is a constant of the loss: the same values' graph, decoded densely, gives the gradients.
    values = sae(x).values
    _dense_prefix_loss(sae, x, values, out.indices)[1].backward()
    for got, want in zip(fused, (p.grad for p in sae.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert out.prefix_fvu[0] > out.prefix_fvu[-1]  # fewer latents, worse reconstruction


def test_uses_batch_topk_selection_and_its_threshold():
    sae = MatryoshkaBatchTopKSAE(12, 40, 4, max_k_per_row=40, backend="cpu", dtype=torch.float64)
    x = correlated_activations(30, 12, seed=8).double()
    out = sae(x)
    assert (out.values > 0).sum() == 4 * 30
    torch.testing.assert_close(sae.threshold, out.values[out.values > 0].min().float())


def test_default_prefixes_halve_down_to_a_sixteenth():
    assert default_prefixes(4096) == [256, 512, 1024, 2048, 4096]
    assert default_prefixes(8) == [1, 2, 4, 8]
    assert MatryoshkaBatchTopKSAE(4, 64, 2).prefix_weights == [0.2] * 5


@pytest.mark.parametrize("kwargs,match", [
    ({"prefixes": [8, 4, 32]}, r"MatryoshkaBatchTopKSAE: prefixes must be strictly increasing"),
    ({"prefixes": [4, 8, 16]}, r"prefixes\[-1\] must be n_latents = 32"),
    ({"prefixes": [4, 8, 16, 33]}, r"prefixes\[-1\] must be n_latents = 32"),
    ({"prefixes": [8, 32], "prefix_weights": [1.0]}, r"prefix_weights must be 2 finite numbers >= 0"),
    ({"prefixes": [8, 32], "prefix_weights": [1.0, -1.0]}, r"prefix_weights must be 2 finite numbers >= 0"),
])
def test_bad_prefixes_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MatryoshkaBatchTopKSAE(6, 32, 2, **kwargs)


def test_save_load_round_trip(tmp_path):
    sae = MatryoshkaBatchTopKSAE(8, 24, 3, prefixes=[3, 12, 24], prefix_weights=[1, 1, 1], backend="cpu")
    x = correlated_activations(16, 8, seed=1)
    sae(x)  # sets the threshold
    sae.save(tmp_path)
    loaded = TopKSAE.load(tmp_path, backend="cpu")
    assert isinstance(loaded, MatryoshkaBatchTopKSAE)
    assert loaded.prefixes == [3, 12, 24] and loaded.prefix_weights == [1.0, 1.0, 1.0]
    torch.testing.assert_close(loaded.threshold, sae.threshold)
    sae.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x).prefix_fvu, sae(x).prefix_fvu)


def test_trainer_and_cli_train_a_matryoshka_sae(tmp_path, capsys):
    from safetensors.torch import save_file

    from pyinterp.sae import cli as sae_cli

    sae = build_sae("matryoshka_batch_topk", 12, 32, 3, backend="cpu", prefixes=[4, 16, 32])
    probe = correlated_activations(64, 12, seed=5)
    sae.init_b_dec(probe)
    first = sae(probe).loss.item()
    config = TrainConfig(tokens=640, batch_size=32, dead_after_tokens=64, progress=False, checkpoint_every=0)
    Trainer(sae, TensorSource(correlated_activations(200, 12)), config, tmp_path / "api").train()
    assert sae(probe).loss.item() < first
    assert isinstance(TopKSAE.load(tmp_path / "api"), MatryoshkaBatchTopKSAE)

    (tmp_path / "shards").mkdir()
    save_file({"activations": correlated_activations(128, 12)}, str(tmp_path / "shards" / "0.safetensors"))
    parser = argparse.ArgumentParser()
    sae_cli.add_arguments(parser)

    def run(*extra):
        return sae_cli.run(parser.parse_args([
            "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "cli"), "--latents", "32", "--k", "3",
            "--tokens", "128", "--batch-size", "32", "--backend", "cpu", "--no-progress", *extra]))

    assert run("--architecture", "matryoshka_batch_topk", "--matryoshka-prefixes", "8,32") == 0
    assert TopKSAE.load(tmp_path / "cli").prefixes == [8, 32]
    assert run("--architecture", "matryoshka_batch_topk", "--matryoshka-prefixes", "8,16") == 2
    assert "prefixes[-1] must be n_latents = 32" in capsys.readouterr().err
    assert run("--matryoshka-prefixes", "8,32") == 2
    assert "--matryoshka-prefixes only applies with --architecture matryoshka_batch_topk" in capsys.readouterr().err
