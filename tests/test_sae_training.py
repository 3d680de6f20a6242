"""SAE modules and trainer: parity with a float64 dense reference of the whole step (AuxK included),
the three library bugs of docs/SAE_TRAINING.md, dead-latent bookkeeping without host syncs, checkpoints (round
trip, resume = uninterrupted run, crash mid-write), sparsify's layout, bad configs, the CLI."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from pyinterp import _atomic
from pyinterp.nn import BatchTopKSAE, TopKSAE
from pyinterp.sae import DeadLatents, ShardSource, TensorSource, TrainConfig, Trainer, build_sae
from pyinterp.sae import checkpoint
from pyinterp.sae import cli as sae_cli
from sae_helpers import correlated_activations, dense_reference_loss, training_backends

torch.set_num_threads(1)


def make_sae(backend="torch", d=12, m=40, k=4, dtype=torch.float64, **kwargs):
    return TopKSAE(d, m, k, backend=backend, dtype=dtype, seed=3, **kwargs)


def parameters_of(sae):
    return [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]


def grads_of(sae):
    return [p.grad for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]


# ---- the module ----
def test_init_follows_the_spec():
    sae = TopKSAE(10, 30, 3, seed=1)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(30))
    assert torch.equal(sae.W_enc, sae.W_dec) and sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.k_aux == 5  # D / 2
    x = correlated_activations(50, 10)
    sae.init_b_dec(x)
    torch.testing.assert_close(sae.b_dec, x.mean(0))
    assert torch.equal(TopKSAE(10, 30, 3, seed=1).W_dec, TopKSAE(10, 30, 3, seed=1).W_dec)


@pytest.mark.parametrize("backend", training_backends())
@pytest.mark.parametrize("num_dead", [0, 7, 40])
def test_loss_and_gradients_match_float64_dense_reference(backend, num_dead):
    sae = make_sae(backend, k_aux=6)
    x = correlated_activations(33, 12, seed=4).double()
    sae.init_b_dec(x[:16])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=torch.Generator().manual_seed(1))[:num_dead]] = True
    reference_params = parameters_of(sae)
    loss_ref, fvu_ref, aux_ref, _ = dense_reference_loss(*reference_params, x, 4, dead_mask=dead, k_aux=6)
    loss_ref.backward()
    out = sae(x, dead_mask=dead)
    out.loss.backward()
    torch.testing.assert_close(out.fvu, fvu_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.aux_loss, aux_ref, rtol=1e-12, atol=1e-15)
    if num_dead:
        assert aux_ref > 0
    for name, ours, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads_of(sae), reference_params):
        torch.testing.assert_close(ours, ref.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", training_backends())
def test_relu_mask_bug_is_caught(backend):
    """Trap 1: with fewer than k positive pre-activations, the negative selected ones get no gradient."""
    sae = make_sae(backend)
    x = correlated_activations(20, 12, seed=5).double()
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)  # most tokens have fewer than k = 4 positive pre-activations
    params, buggy = parameters_of(sae), parameters_of(sae)
    dense_reference_loss(*params, x, 4)[0].backward()
    dense_reference_loss(*buggy, x, 4, relu_mask=False)[0].backward()
    assert not torch.allclose(params[0].grad, buggy[0].grad), "data must exercise the ReLU mask"
    sae(x).loss.backward()
    torch.testing.assert_close(sae.W_enc.grad, params[0].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sae.b_enc.grad, params[1].grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", training_backends())
def test_aux_gradient_reaching_the_encoder_is_checked(backend):
    """Trap 2: AuxK must train the dead latents' encoder rows, not only their decoder rows."""
    sae = make_sae(backend, k_aux=6)
    x = correlated_activations(24, 12, seed=6).double()
    sae.init_b_dec(x)
    dead = torch.arange(40) >= 20
    params, buggy = parameters_of(sae), parameters_of(sae)
    dense_reference_loss(*params, x, 4, dead_mask=dead, k_aux=6)[0].backward()
    dense_reference_loss(*buggy, x, 4, dead_mask=dead, k_aux=6, aux_reaches_encoder=False)[0].backward()
    assert not torch.allclose(params[0].grad[dead], buggy[0].grad[dead])
    sae(x, dead_mask=dead).loss.backward()
    assert sae.W_enc.grad[dead].abs().sum() > 0
    torch.testing.assert_close(sae.W_enc.grad, params[0].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sae.b_enc.grad, params[1].grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", training_backends())
def test_b_dec_added_twice_in_aux_is_caught(backend):
    """Trap 3: e = x - x_hat already contains b_dec; e_hat must not add it again."""
    sae = make_sae(backend, k_aux=6)
    x = correlated_activations(24, 12, seed=7, offset=3.0).double()
    sae.init_b_dec(x)
    dead = torch.arange(40) < 25
    params = parameters_of(sae)
    _, _, aux_ok, _ = dense_reference_loss(*params, x, 4, dead_mask=dead, k_aux=6)
    _, _, aux_bug, _ = dense_reference_loss(*params, x, 4, dead_mask=dead, k_aux=6, aux_adds_b_dec=True)
    assert not torch.isclose(aux_ok, aux_bug, rtol=1e-3)
    torch.testing.assert_close(sae(x, dead_mask=dead).aux_loss, aux_ok, rtol=1e-12, atol=0)


def test_leading_dims_and_encode_decode_agree_with_forward():
    sae = make_sae()
    x = correlated_activations(24, 12).double().reshape(2, 3, 4, 12)
    out = sae(x)
    values, indices = sae.encode(x)
    assert out.x_hat.shape == x.shape and values.shape == (2, 3, 4, 4)
    torch.testing.assert_close(sae.decode(values, indices), out.x_hat)


def test_batch_topk_keeps_k_times_n_over_the_batch_and_thresholds_at_inference():
    sae = BatchTopKSAE(12, 40, 4, max_k_per_row=40, backend="torch", dtype=torch.float64, seed=2)
    x = correlated_activations(30, 12, seed=8).double()
    sae.init_b_dec(x)
    out = sae(x)
    z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    dense_top = torch.zeros(z.numel(), dtype=torch.bool)
    dense_top[z.reshape(-1).topk(4 * 30).indices] = True
    expected = torch.where(dense_top.reshape(z.shape) & (z > 0), z, 0)
    got = torch.zeros_like(z).scatter_(1, out.indices.long(), out.values)
    torch.testing.assert_close(got, expected.detach())
    active = (out.values > 0).sum(1)
    assert active.sum() == 120 and active.min() != active.max()
    smallest = out.values[out.values > 0].min()
    torch.testing.assert_close(sae.threshold, smallest.float())  # the first batch sets it
    sae.eval()
    with torch.no_grad():
        values, _ = sae.encode(x)
    assert ((values == 0) | (values > sae.threshold)).all()


# ---- dead latents ----
def test_dead_latent_bookkeeping():
    dead = DeadLatents(6, offset=0, dead_after_tokens=10, device="cpu")
    values = torch.tensor([[1.0, 0.0], [2.0, 0.5]])
    indices = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    dead.record(values, indices)
    dead.end_step(tokens=4)
    assert dead.tokens_since_fired.tolist() == [0, 4, 0, 4, 4, 4]  # a zero value is not a fire
    for _ in range(2):
        dead.record(torch.tensor([[1.0]]), torch.tensor([[3]], dtype=torch.int32))
        dead.end_step(tokens=4)
    assert dead.tokens_since_fired.tolist() == [8, 12, 8, 0, 12, 12]
    assert dead.mask().tolist() == [False, True, False, False, True, True]
    sharded = DeadLatents(3, offset=3, dead_after_tokens=10, device="cpu")
    sharded.record(torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 4]], dtype=torch.int32))
    sharded.end_step(tokens=2)
    assert sharded.tokens_since_fired.tolist() == [2, 0, 2]  # latent 1 belongs to another rank


class _HostSyncDetector(TorchDispatchMode):
    """Records the aten ops that read device data back to the host."""
    SYNCING = ("_local_scalar_dense", "aten.nonzero", "masked_select", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("architecture", ["topk", "batch_topk", "matryoshka_batch_topk"])
def test_training_step_has_no_host_sync(architecture):
    with _HostSyncDetector() as control:
        int((torch.arange(3) > 0).sum())
    assert control.syncs, "the detector must see int(tensor)"
    sae = build_sae(architecture, 12, 40, 4, backend="torch", k_aux=6)
    config = TrainConfig(tokens=4000, batch_size=32, grad_accumulation=2, dead_after_tokens=64, progress=False)
    trainer = Trainer(sae, TensorSource(correlated_activations(500, 12)), config)
    for _ in range(3):
        trainer.train_step()
    assert trainer.dead.mask().any(), "AuxK must be active in the step under test"
    with _HostSyncDetector() as detector:
        trainer.train_step()
    assert detector.syncs == []
    before = [p.detach().clone() for p in sae.parameters()]
    trainer._batch = lambda step, accumulation: torch.full((32, 12), float("nan"))  # noqa: E731
    with _HostSyncDetector() as detector:
        trainer.train_step()  # skipped on the device: still no sync
    assert detector.syncs == []
    assert all(torch.equal(a, b) for a, b in zip(before, sae.parameters()))


# ---- the whole step against a float64 reference ----
def reference_training(sae, batches_per_step, steps, k, *, lr, dead_after_tokens, k_aux):
    """Dense float64 training: mean micro-batch loss, decoder-gradient projection, Adam, renorm."""
    params = parameters_of(sae)
    optimizer = torch.optim.Adam(params, lr=lr, foreach=False)
    tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.int64)
    for step in range(steps):
        dead = tokens_since_fired >= dead_after_tokens
        fired = torch.zeros(sae.n_latents, dtype=torch.bool)
        micro_batches = batches_per_step(step)
        for x in micro_batches:
            loss, _, _, active = dense_reference_loss(*params, x, k, dead_mask=dead, k_aux=k_aux)
            (loss / len(micro_batches)).backward()
            fired |= active.any(0)
        W_dec = params[2]
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        tokens_since_fired = torch.where(fired, 0, tokens_since_fired + sum(len(x) for x in micro_batches))
    return params, tokens_since_fired


@pytest.mark.parametrize("backend", training_backends())
def test_training_steps_match_float64_reference(backend):
    sae = make_sae(backend, k_aux=6)
    config = TrainConfig(tokens=10**6, batch_size=16, grad_accumulation=2, lr=3e-3, dead_after_tokens=32,
                         progress=False)
    trainer = Trainer(sae, TensorSource(correlated_activations(400, 12, seed=9)), config)
    initial = make_sae(backend, k_aux=6)
    initial.load_state_dict(sae.state_dict())
    batches = lambda step: [trainer._batch(step, i).double() for i in range(2)]  # noqa: E731
    for _ in range(5):
        trainer.train_step()
    params, tokens_since_fired = reference_training(initial, batches, 5, 4, lr=3e-3, dead_after_tokens=32,
                                                    k_aux=6)
    assert (tokens_since_fired >= 32).any(), "AuxK must have been active"
    for name, ours, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"),
                               (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), params):
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-7, atol=1e-9, msg=name)
    assert torch.equal(trainer.dead.tokens_since_fired, tokens_since_fired)


def test_bf16_autocast_keeps_fp32_master_weights():
    sae = build_sae("topk", 12, 40, 4, backend="torch")
    config = TrainConfig(tokens=640, batch_size=32, precision="bf16", progress=False)
    trainer = Trainer(sae, TensorSource(correlated_activations(400, 12)), config)
    with trainer._autocast():
        out = sae(trainer._batch(0, 0))
    assert out.x_hat.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    before = sae.W_enc.detach().clone()
    trainer.train()
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert not torch.equal(before, sae.W_enc)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


# ---- checkpoints ----
def small_trainer(tmp_path, tokens=16 * 2 * 8, resume=False, **overrides):
    sae = build_sae("topk", 12, 40, 4, backend="torch", k_aux=6)
    options = dict(tokens=tokens, batch_size=16, grad_accumulation=2, lr=3e-3, dead_after_tokens=48,
                   log_every=2, progress=False)
    config = TrainConfig(**{**options, **overrides})
    return Trainer(sae, TensorSource(correlated_activations(300, 12, seed=10)), config, tmp_path,
                   resume=resume)


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    straight = small_trainer(tmp_path / "straight")
    straight.train()
    interrupted = small_trainer(tmp_path / "resumed")
    for _ in range(3):
        interrupted.train_step()
    interrupted.save_checkpoint()
    resumed = small_trainer(tmp_path / "resumed", resume=True)
    assert resumed.step == 3
    resumed.train()
    for (name, a), b in zip(straight.sae.named_parameters(), resumed.sae.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.dead.tokens_since_fired, resumed.dead.tokens_since_fired)
    for a, b in zip(straight.sae.parameters(), resumed.sae.parameters()):
        state_a, state_b = straight.optimizer.state[a], resumed.optimizer.state[b]
        assert all(torch.equal(state_a[key], state_b[key]) for key in ("exp_avg", "exp_avg_sq", "step"))


def test_checkpoint_round_trip_and_saved_sae(tmp_path):
    trainer = small_trainer(tmp_path)
    trainer.train()
    tensors, state = checkpoint.read_checkpoint(tmp_path)
    assert state["step"] == trainer.step and state["sae"] == trainer.sae.config()
    saved = trainer.checkpoint_tensors()
    assert tensors.keys() == saved.keys()
    assert all(torch.equal(tensors[name], saved[name].cpu()) for name in saved)
    manifest = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    assert {key: value for key, value in manifest.items() if key in state} == state
    loaded = TopKSAE.load(tmp_path, backend="torch")
    for a, b in zip(loaded.parameters(), trainer.sae.parameters()):
        assert torch.equal(a, b)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == trainer.step // 2 and {"fvu", "l0", "dead_fraction", "tokens_per_s"} <= json.loads(lines[0]).keys()


def test_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path)
    trainer.train_step()
    trainer.save_checkpoint()
    trainer.train_step()

    def torn_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(_atomic, "save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()

    def crash_before_rename(src, dst):
        raise OSError("power cut before the rename")

    monkeypatch.setattr(_atomic.os, "replace", crash_before_rename)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].startswith("checkpoint-000000001-") and names[1] == "checkpoint.json"
    resumed = small_trainer(tmp_path, resume=True)
    assert resumed.step == 1


def test_resume_rejects_a_different_run(tmp_path):
    small_trainer(tmp_path).train()
    sae = build_sae("topk", 12, 48, 4, backend="torch", k_aux=6)
    config = TrainConfig(tokens=512, batch_size=16, grad_accumulation=2, progress=False)
    with pytest.raises(ValueError, match="n_latents=48 but the checkpoint .* n_latents=40"):
        Trainer(sae, TensorSource(correlated_activations(300, 12)), config, tmp_path, resume=True)
    with pytest.raises(ValueError, match="batch_size=8 but the checkpoint .* batch_size=16"):
        small_trainer(tmp_path, resume=True, batch_size=8)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        small_trainer(tmp_path / "empty", resume=True)


# ---- sparsify's layout ----
def write_sparsify_layout(folder, d, m, k, seed=0):
    """A folder as sparsify's SparseCoder.save_to_disk writes it (names from its published layout)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(m, d, generator=g), "encoder.bias": torch.randn(m, generator=g) * 0.1,
               "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": m, "k": k,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}))
    return tensors


def test_loads_an_sae_in_sparsifys_layout_and_runs_it(tmp_path):
    tensors = write_sparsify_layout(tmp_path / "layers.3", 12, 40, 5)
    with pytest.raises(FileNotFoundError, match="layers.3"):
        TopKSAE.load(tmp_path)
    sae = TopKSAE.load(tmp_path / "layers.3", backend="torch")
    assert (sae.d_model, sae.n_latents, sae.k) == (12, 40, 5)
    x = correlated_activations(9, 12)
    z = (x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"]
    top = z.topk(5, dim=1)
    expected = torch.relu(top.values)[:, :, None].mul(tensors["W_dec"][top.indices]).sum(1) + tensors["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae(x).x_hat, expected, rtol=1e-5, atol=1e-5)


def test_sparsify_itself_loads_and_agrees(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    theirs = sparsify.SparseCoder(12, sparsify.SparseCoderConfig(num_latents=40, k=5), dtype=torch.float32)
    with torch.no_grad():
        theirs.encoder.bias.normal_(0, 0.1)
        theirs.b_dec.normal_()
    theirs.save_to_disk(tmp_path / "theirs")
    ours = TopKSAE.load(tmp_path / "theirs", backend="torch")
    x = correlated_activations(9, 12)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x).x_hat, expected.sae_out, rtol=1e-5, atol=1e-5)
    ours.save(tmp_path / "ours")
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
    assert torch.equal(again.encoder.weight, theirs.encoder.weight)


# ---- bad configurations ----
def test_bad_configs_are_rejected_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="k must be in"):
        TopKSAE(12, 8, 9)
    with pytest.raises(ValueError, match="k_aux"):
        TopKSAE(12, 8, 2, k_aux=9)
    sae = build_sae("topk", 16, 40, 4, backend="torch")
    with pytest.raises(ValueError, match="d_model: the activations are 12 wide .* d_model=16"):
        Trainer(sae, TensorSource(correlated_activations(100, 12)), TrainConfig(progress=False))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1).validate()
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8").validate()
    with pytest.raises(ValueError, match="parallel='latents' supports"):
        build_sae("batch_topk", 12, 40, 4, parallel="latents")
    with pytest.raises(ValueError, match="d_model"):
        make_sae()(torch.randn(3, 5, dtype=torch.float64))


def test_unreadable_shards_are_rejected_naming_the_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"shards: cannot read .*a\.safetensors"):
        ShardSource(tmp_path)
    (tmp_path / "a.safetensors").unlink()
    np.save(tmp_path / "b.npy", np.zeros((4, 3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"b\.npy.*2-D"):
        ShardSource(tmp_path)
    (tmp_path / "b.npy").unlink()
    with pytest.raises(ValueError, match="holds no"):
        ShardSource(tmp_path)
    np.save(tmp_path / "c.npy", np.zeros((4, 3), dtype=np.float32))
    save_file({"activations": torch.zeros(4, 5)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="disagree on d_model"):
        ShardSource(tmp_path)


# ---- the CLI ----
def cli_args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    sae_cli.add_arguments(parser)
    return parser.parse_args(["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "out"),
                              "--latents", "64", "--k", "4", "--tokens", "2048", "--batch-size", "128",
                              "--backend", "torch", "--no-progress", "--log-every", "4",
                              "--checkpoint-every", "8", *extra])


def test_cli_trains_resumes_and_rejects_bad_arguments(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    x = correlated_activations(1500, 12, seed=11)
    save_file({"activations": x[:700]}, str(tmp_path / "shards" / "0.safetensors"))
    np.save(tmp_path / "shards" / "1.npy", x[700:].numpy())
    assert sae_cli.run(cli_args(tmp_path)) == 0
    assert "done: step 16" in capsys.readouterr().out
    assert sae_cli.run(cli_args(tmp_path, "--tokens", "4096", "--resume")) == 0
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(4, 33, 4))
    assert metrics[-1]["fvu"] < metrics[0]["fvu"]
    assert TopKSAE.load(tmp_path / "out").n_latents == 64
    assert sae_cli.run(cli_args(tmp_path, "--k", "100")) == 2
    assert "--k 100 is more than --latents 64" in capsys.readouterr().err
    os.remove(tmp_path / "shards" / "1.npy")
    (tmp_path / "shards" / "1.npy").write_bytes(b"garbage")
    assert sae_cli.run(cli_args(tmp_path)) == 2
    assert "shards: cannot read" in capsys.readouterr().err
