"""CrossLayerTranscoder: the sparse forward and backward (one sparse decode per target layer) against
the dense CLT of pyinterp/reference/cross_layer_transcoder.py on every backend of its two ops, the
decoder norm bookkeeping, save/load in both layouts, bad input, and training through the streaming
trainer (`train-sae --corpus ... --clt`)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyinterp.nn import CrossLayerTranscoder
from pyinterp.reference import cross_layer_transcoder as reference
from helpers import assert_close_to_float64, backends, exact_like

BACKENDS = [b for b in backends("topk_encode") if b in backends("sparse_decode")]
FLOAT64_BACKENDS = [b for b in BACKENDS if b != "triton"]  # the Triton encoder has no float64 path
# (N, L, d_in, d_out, M, k): one layer, k = M, k = 1, N = 1, widths that are not powers of two.
SHAPES = [(1, 1, 3, 2, 5, 5), (7, 3, 9, 5, 13, 4), (5, 4, 6, 7, 7, 1)]


def exact_clt(shape, backend, dtype, seed=0):
    """A CLT with small dyadic weights (every product and sum exact in fp32, ties included, so the
    selection cannot depend on the dtype), rows of such values, and a dead mask."""
    n, layers, d_in, d_out, m, k = shape
    clt = CrossLayerTranscoder(layers, d_in, d_out, m, k, k_aux=min(2, m), backend=backend, dtype=dtype)
    with torch.no_grad():
        for offset, (name, parameter) in enumerate(clt.named_parameters()):
            parameter.copy_(exact_like(tuple(parameter.shape), seed=seed + offset, dtype=dtype))
    rows = exact_like((n, clt.d_model), seed=seed + 50, dtype=dtype, scale=0.5)
    dead = torch.arange(clt.n_latents) % 3 == 1
    return clt, rows, dead


def sparse_loss_and_grads(clt, rows, dead):
    clt.zero_grad()
    out = clt(rows, dead, variance_floor=0.5)
    out.loss.backward()
    return out, {name: p.grad.double() for name, p in clt.named_parameters()}


def dense_loss_and_grads(clt, rows, dead):
    """The dense reference on float64 copies of the CLT's parameters."""
    params = {name: p.detach().double().requires_grad_() for name, p in clt.named_parameters()}
    x, y = clt._split(rows.double())
    W_dec = [params[f"W_dec.{t}"] for t in range(clt.n_layers)]
    y_hat, aux_hat, _ = reference.cross_layer_transcoder(x, params["W_enc"], params["b_enc"], W_dec,
                                                         params["b_dec"], clt.k, dead, clt.k_aux)
    fvu, aux = reference.losses(y, y_hat, aux_hat, dead, clt.k_aux, variance_floor=0.5)
    (fvu + clt.aux_alpha * aux).sum().backward()
    return y_hat, fvu, aux, {name: p.grad for name, p in params.items()}


def check_against_dense(clt, rows, dead, tolerance):
    out, grads = sparse_loss_and_grads(clt, rows, dead)
    y_hat, fvu, aux, dense_grads = dense_loss_and_grads(clt, rows, dead)
    close = dict(rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(out.y_hat.double(), y_hat, **close)
    torch.testing.assert_close(out.fvu_per_layer.double(), fvu, **close)
    torch.testing.assert_close(out.aux_per_layer.double(), aux, **close)
    torch.testing.assert_close(out.loss.double(), (fvu + clt.aux_alpha * aux).sum(), **close)
    assert set(grads) == set(dense_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], **close, msg=lambda m: f"grad {name}: {m}")
    return out


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_forward_and_backward_equal_the_dense_clt_in_float64(backend, shape):
    g = torch.Generator().manual_seed(sum(shape))
    clt = CrossLayerTranscoder(*shape[1:], k_aux=2, backend=backend, dtype=torch.float64, seed=3)
    with torch.no_grad():
        clt.b_enc.normal_(generator=g)
        clt.b_dec.normal_(generator=g)
    rows = torch.randn(shape[0], clt.d_model, generator=g, dtype=torch.float64)
    dead = torch.rand(clt.n_latents, generator=g) < 0.4
    out = check_against_dense(clt, rows, dead, 1e-10)
    assert out.values.shape == out.indices.shape == (shape[0], shape[1] * shape[-1])
    layer_of_column = torch.arange(shape[1]).repeat_interleave(shape[-1])
    assert torch.equal(out.indices.long() // clt.latents_per_layer, layer_of_column.expand_as(out.indices))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_every_backend_in_float32_on_exact_data_equals_the_float64_dense_clt(backend, shape):
    clt, rows, dead = exact_clt(shape, backend, torch.float32, seed=sum(shape))
    check_against_dense(clt, rows, dead, 2e-5)


def linear_probe(clt, rows, weights, dtype, *, dense):
    """y_hat and the gradients of sum(y_hat * weights) in `dtype`: the CLT's sparse path, or the dense
    reference on copies of its parameters."""
    x = clt._split(rows)[0].to(dtype)
    if dense:
        params = {name: p.detach().to(dtype).requires_grad_() for name, p in clt.named_parameters()}
        y_hat = reference.cross_layer_transcoder(x, params["W_enc"], params["b_enc"],
                                                 [params[f"W_dec.{t}"] for t in range(clt.n_layers)],
                                                 params["b_dec"], clt.k)[0]
    else:
        params = dict(clt.named_parameters())
        clt.zero_grad()
        y_hat = clt.transcode(x)
    (y_hat.double() * weights).sum().backward()
    return {"y_hat": y_hat, **{f"grad {name}": p.grad for name, p in params.items()}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_backward_within_dtype_tolerance(backend, dtype):
    clt, rows, _ = exact_clt(SHAPES[1], backend, dtype, seed=9)
    weights = exact_like((rows.shape[0], clt.n_layers, clt.d_out), seed=99).double()
    got = linear_probe(clt, rows, weights, dtype, dense=False)
    ref_lowp = linear_probe(clt, rows, weights, dtype, dense=True)
    ref64 = linear_probe(clt, rows, weights, torch.float64, dense=True)
    for name in ref64:
        assert_close_to_float64(got[name], ref_lowp[name], ref64[name], name)


def test_without_dead_latents_the_aux_loss_is_zero_and_decode_of_encode_is_transcode():
    clt, rows, _ = exact_clt(SHAPES[1], "cpu", torch.float64)
    out = clt(rows, torch.zeros(clt.n_latents, dtype=torch.bool))
    assert out.aux_loss.item() == 0 and torch.equal(out.loss, out.fvu_per_layer.sum())
    x = clt._split(rows)[0]
    values, indices = clt.encode(x)
    torch.testing.assert_close(clt.decode(values, indices), clt.transcode(x), rtol=0, atol=0)
    torch.testing.assert_close(clt.transcode(x), out.y_hat, rtol=0, atol=0)


def test_decoder_norm_and_gradient_projection_act_on_each_latents_whole_decoder():
    clt, rows, dead = exact_clt(SHAPES[2], "cpu", torch.float64)
    clt(rows, dead).loss.backward()
    clt.normalize_decoder()
    clt.project_decoder_grad()
    norms, parallel = torch.zeros(clt.n_latents, dtype=torch.float64), torch.zeros(clt.n_latents, dtype=torch.float64)
    for w in clt.W_dec:
        norms[:w.shape[0]] += w.pow(2).sum(1)
        parallel[:w.shape[0]] += (w.grad * w).sum(1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    torch.testing.assert_close(parallel, torch.zeros_like(parallel), atol=1e-12, rtol=0)
    before = [w.detach().clone() for w in clt.W_dec]
    with torch.no_grad():
        clt.W_dec[0].mul_(3)
    clt.normalize_decoder(applied=torch.tensor(False))
    assert torch.equal(clt.W_dec[0], 3 * before[0])


def test_save_load_and_the_circuit_tracer_layout_round_trip(tmp_path):
    clt, rows, dead = exact_clt(SHAPES[1], "cpu", torch.float32)
    expected = clt(rows, dead).y_hat
    clt.save(tmp_path / "own")
    loaded = CrossLayerTranscoder.load(tmp_path / "own", backend="torch")
    torch.testing.assert_close(loaded(rows, dead).y_hat, expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "own" / "cfg.json").read_text())["pyinterp"] == clt.config()

    clt.save_circuit_tracer(tmp_path / "ct")
    layers, m, d_out = clt.n_layers, clt.latents_per_layer, clt.d_out
    for layer in range(layers):  # circuit-tracer's names and shapes
        encoder = load_file(str(tmp_path / "ct" / f"W_enc_{layer}.safetensors"))
        assert {name: tuple(t.shape) for name, t in encoder.items()} == {
            f"W_enc_{layer}": (m, clt.d_in), f"b_enc_{layer}": (m,), f"b_dec_{layer}": (d_out,)}
        decoder = load_file(str(tmp_path / "ct" / f"W_dec_{layer}.safetensors"))[f"W_dec_{layer}"]
        assert decoder.shape == (m, layers - layer, d_out)
        # latent i of `layer` into target layer + 1 is row layer*M + i of our W_dec[layer + 1]
        if layer + 1 < layers:
            assert torch.equal(decoder[:, 1], clt.W_dec[layer + 1][layer * m:(layer + 1) * m])
    again = CrossLayerTranscoder.load_circuit_tracer(tmp_path / "ct", clt.k, backend="torch")
    torch.testing.assert_close(again(rows, dead).y_hat, expected, rtol=0, atol=0)

    encoder = load_file(str(tmp_path / "ct" / "W_enc_0.safetensors"))
    save_file({**encoder, "threshold_0": torch.zeros(m)}, str(tmp_path / "ct" / "W_enc_0.safetensors"))
    with pytest.raises(ValueError, match="JumpReLU CLT"):
        CrossLayerTranscoder.load_circuit_tracer(tmp_path / "ct", clt.k)
    assert CrossLayerTranscoder.load_circuit_tracer(tmp_path / "ct", clt.k, drop_thresholds=True).n_layers == layers
    with pytest.raises(FileNotFoundError, match="use load_circuit_tracer"):
        CrossLayerTranscoder.load(tmp_path / "ct")


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\] \(1 <= k <= latents_per_layer\)"):
        CrossLayerTranscoder(2, 4, 4, 8, 9)
    with pytest.raises(ValueError, match="n_layers"):
        CrossLayerTranscoder(0, 4, 4, 8, 2)
    with pytest.raises(ValueError, match="k_aux"):
        CrossLayerTranscoder(2, 4, 4, 8, 2, k_aux=9)
    clt = CrossLayerTranscoder(2, 4, 3, 8, 2, backend="cpu")
    with pytest.raises(ValueError, match=r"rows must have shape \(\.\.\., 14\)"):
        clt(torch.zeros(5, 13))
    with pytest.raises(ValueError, match="dead_mask"):
        clt(torch.zeros(5, 14), torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2, 4\)"):
        clt.encode(torch.zeros(5, 3, 4))
    values, indices = clt.encode(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="must be layer l's latents"):
        clt.decode(values, indices.flip(-1))


def small_trainer(folder, resume=False):
    from pyinterp.sae import TensorSource, TrainConfig, Trainer
    from sae_helpers import correlated_activations

    clt = CrossLayerTranscoder(3, 4, 4, 10, 2, k_aux=3, backend="cpu")
    config = TrainConfig(tokens=32 * 8, batch_size=32, dead_after_tokens=64, log_every=4, checkpoint_every=4,
                         progress=False)
    return Trainer(clt, TensorSource(correlated_activations(400, clt.d_model)), config, folder, resume=resume)


def test_a_training_step_has_no_host_sync_and_a_skipped_step_changes_nothing():
    from test_sae_training import _HostSyncDetector

    trainer = small_trainer(None)
    for _ in range(3):
        trainer.train_step()
    assert trainer.dead.mask().any(), "AuxK must be active in the step under test"
    with _HostSyncDetector() as detector:
        trainer.train_step()
    assert detector.syncs == []
    before = [p.detach().clone() for p in trainer.sae.parameters()]
    trainer._batch = lambda step, accumulation: torch.full((32, trainer.sae.d_model), float("nan"))  # noqa: E731
    with _HostSyncDetector() as detector:
        trainer.train_step()  # skipped on the device: still no sync
    assert detector.syncs == [] and all(torch.equal(a, b) for a, b in zip(before, trainer.sae.parameters()))


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    small_trainer(tmp_path / "whole").train()
    first_half = small_trainer(tmp_path / "halves")
    for _ in range(4):
        first_half.train_step()
    first_half.save_checkpoint()
    small_trainer(tmp_path / "halves", resume=True).train()
    whole, halves = CrossLayerTranscoder.load(tmp_path / "whole"), CrossLayerTranscoder.load(tmp_path / "halves")
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), halves.parameters()))


def test_streaming_trainer_trains_a_clt_over_every_mlp_of_a_tiny_model(tmp_path, capsys):
    """`train-sae --corpus ... --clt 'transformer.h.*.mlp'` beside a plain SAE, from one model
    forward: the CLT's FVU falls, and the trained CLT loads."""
    from pyinterp import cli, models
    from test_sae_cache import tiny_model, write_corpus

    tokenizer = models.load_default_model().tokenizer
    model = tiny_model("gpt2", tokenizer.vocab_size, initializer_range=0.3)  # MLP outputs of order 1
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    corpus = write_corpus(tmp_path, "txt")
    out = tmp_path / "out"
    assert cli.main(["train-sae", "--model", str(tmp_path / "model"), "--corpus", str(corpus),
                     "--clt", "transformer.h.*.mlp", "--layers", "1", "--latents", "24", "--k", "3",
                     "--tokens", str(96 * 20), "--batch-size", "96", "--lr", "3e-3", "--context-length", "13",
                     "--backend", "cpu", "--buffer-tokens", "400", "--log-every", "4", "--out", str(out)]) == 0
    assert "clt-transformer.h.all.mlp" in capsys.readouterr().out
    folder = out / "clt-transformer.h.all.mlp"
    fvus = [json.loads(line)["fvu"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(fvus) == 5 and fvus[-1] < 0.8 * fvus[0]
    clt = CrossLayerTranscoder.load(folder, backend="cpu")
    assert (clt.n_layers, clt.d_in, clt.d_out, clt.latents_per_layer) == (3, 16, 16, 24)
    assert (out / "transformer.h.0" / "sae.safetensors").is_file()  # layer 1: block 0's output
