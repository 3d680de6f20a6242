"""Faults in SAE training: non-finite activations and losses (skipped on the device, stop / skip
policy, never saved), a batch of identical tokens, resume checks (finished runs, another source or
setting, metrics.jsonl), checkpoint integrity (checksum, missing fields and tensors, leftovers of
killed writers), and kill -9 inside checkpoint writes, in one process and under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pyinterp.nn import TopKSAE
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae, checkpoint
from pyinterp.sae.checkpoint import CheckpointError
from pyinterp.sae.trainer import NonFiniteError

WIDTH, LATENTS, K = 12, 40, 4
torch.set_num_threads(1)


def activations(tokens=300, seed=10) -> torch.Tensor:
    """Correlated Gaussian tokens with a mean (as sae_helpers', rebuilt here so that a child
    process needs only pyinterp)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5
    return torch.randn(tokens, WIDTH, generator=g) @ mixing + 2.0


def make_trainer(out=None, data=None, resume=False, allow_changes=False, **overrides) -> Trainer:
    sae = build_sae("topk", WIDTH, LATENTS, K, backend="torch", k_aux=6)
    options = dict(tokens=16 * 2 * 8, batch_size=16, grad_accumulation=2, lr=3e-3, dead_after_tokens=48,
                   log_every=2, checkpoint_every=3, progress=False)
    source = TensorSource(activations() if data is None else data)
    return Trainer(sae, source, TrainConfig(**{**options, **overrides}), out, resume=resume,
                   allow_changes=allow_changes)


def training_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters, Adam moments and steps, dead counters (not the log window's sums)."""
    return {name: t.detach().clone() for name, t in trainer.checkpoint_tensors().items()
            if not name.startswith("window.")}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def poisoned(rows, value=float("nan")) -> torch.Tensor:
    data = activations()
    data[rows, 3] = value
    return data


def steps_reading(trainer: Trainer) -> dict[int, list[int]]:
    """Token row -> the steps whose micro-batches hold it."""
    steps: dict[int, list[int]] = {}
    for step in range(trainer.total_steps):
        for i in range(trainer.config.grad_accumulation):
            for row in trainer.stream.token_indices(trainer._micro_batch_index(step, i)).tolist():
                steps.setdefault(row, []).append(step)
    return steps


# ---- non-finite values ----
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_step_changes_nothing_and_is_counted(value):
    reading = steps_reading(make_trainer())
    row = next(r for r, steps in sorted(reading.items()) if steps[0] > 0)
    bad_step = reading[row][0]
    trainer = make_trainer(data=poisoned([row], value), nonfinite="skip")
    while trainer.step < bad_step:
        trainer.train_step()
    before = training_state(trainer)
    trainer.train_step()
    assert_same(before, training_state(trainer))  # parameters, Adam moments and steps, dead counters
    metrics = trainer.collect_metrics(1.0, bad_step + 1)
    assert metrics["skipped_steps"] == 1 and np.isfinite(metrics["fvu"])
    trainer.train_step()  # the next step trains again
    assert not torch.equal(before["sae.encoder.weight"], trainer.sae.W_enc)


def test_a_skipped_step_leaves_batch_topks_threshold():
    sae = build_sae("batch_topk", WIDTH, LATENTS, K, backend="torch", k_aux=6)
    config = TrainConfig(tokens=16 * 8, batch_size=16, lr=3e-3, nonfinite="skip", progress=False)
    trainer = Trainer(sae, TensorSource(activations()), config)
    trainer.train_step()
    threshold = sae.threshold.clone()
    bad = activations()[:16]
    bad[0] = float("inf")  # the other, finite rows would move the threshold
    trainer._batch = lambda step, accumulation: bad  # noqa: E731
    trainer.train_step()
    assert trainer.collect_metrics(1.0, 2)["skipped_steps"] == 1
    assert torch.equal(sae.threshold, threshold)


def test_stop_policy_ends_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    reading = steps_reading(make_trainer())
    row = next(r for r, steps in sorted(reading.items()) if steps[0] >= 4)
    trainer = make_trainer(tmp_path, data=poisoned([row]), checkpoint_every=1, log_every=100)
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient \(the first at step \d+\); the "
                                             r"activations themselves were non-finite"):
        trainer.train()
    tensors, state = checkpoint.read_checkpoint(tmp_path)
    assert state["step"] == reading[row][0]  # the checkpoint before the bad step is the last
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert not (tmp_path / "sae.safetensors").exists()


def test_skip_policy_trains_through_and_counts():
    reading = steps_reading(make_trainer())
    rows = [r for r, steps in sorted(reading.items()) if steps[0] > 0][:3]
    bad_steps = set().union(*(reading[r] for r in rows))
    trainer = make_trainer(data=poisoned(rows), nonfinite="skip", log_every=8)
    trainer.train()
    assert trainer.skipped_steps == len(bad_steps) > 0
    assert all(torch.isfinite(p).all() for p in trainer.sae.parameters())
    first_step = sorted(r for r, steps in reading.items() if steps[0] == 0)
    hopeless = make_trainer(data=poisoned([r for r in range(300) if r not in first_step]), nonfinite="skip")
    with pytest.raises(NonFiniteError, match="2 of the last 2 steps .* no step of the window could be applied"):
        hopeless.train()


def test_a_non_finite_first_step_and_a_non_finite_checkpoint_are_refused(tmp_path):
    with pytest.raises(NonFiniteError, match="first step's activations"):
        make_trainer(data=torch.full((300, WIDTH), float("nan")))
    trainer = make_trainer(tmp_path)
    trainer.train_step()
    trainer.save_checkpoint()
    good = checkpoint.read_checkpoint(tmp_path)
    with torch.no_grad():
        trainer.sae.W_dec[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint .* sae.W_dec"):
        trainer.save_checkpoint()
    assert_same(good[0], checkpoint.read_checkpoint(tmp_path)[0])


def test_a_batch_of_identical_tokens_has_a_finite_loss():
    sae = TopKSAE(WIDTH, LATENTS, K, backend="torch", k_aux=6)
    constant = torch.ones(16, WIDTH)
    dead = torch.ones(LATENTS, dtype=torch.bool)
    assert torch.isinf(sae(constant).fvu)  # the FVU of the batch alone is x / 0
    out = sae(constant, dead, variance_floor=0.5)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    x = activations()[:16]
    torch.testing.assert_close(sae(x, variance_floor=1e-3).fvu, sae(x).fvu, rtol=0, atol=0)
    trainer = make_trainer()
    trainer._batch = lambda step, accumulation: constant  # noqa: E731
    trainer.train_step()
    metrics = trainer.collect_metrics(1.0, 1)
    assert metrics["skipped_steps"] == 0 and np.isfinite(metrics["fvu"])
    with pytest.raises(ValueError, match="all identical"):
        make_trainer(data=torch.ones(300, WIDTH))


# ---- resume ----
def test_resume_of_a_finished_run_and_of_a_shorter_one(tmp_path):
    first = make_trainer(tmp_path)
    metrics = first.train()
    done = training_state(first)
    (tmp_path / "sae.safetensors").unlink()  # as if killed before the SAE was written
    again = make_trainer(tmp_path, resume=True)
    assert again.train() == metrics
    assert_same(done, training_state(again))
    assert TopKSAE.load(tmp_path).n_latents == LATENTS
    with pytest.raises(CheckpointError, match=r"at step 8 \(256 tokens\), past the 4 steps of tokens=128"):
        make_trainer(tmp_path, resume=True, tokens=128)


def test_resume_refuses_another_source_or_setting_unless_allowed(tmp_path):
    make_trainer(tmp_path, tokens=16 * 2 * 3).train()
    cases = [(dict(data=activations(seed=11)), "source"), (dict(precision="bf16"), "precision: 'fp32'"),
             (dict(dead_after_tokens=64), "dead_after_tokens: 48"), (dict(lr=1e-3), "lr: 0.003"),
             (dict(adam_eps=1e-6), "adam_eps")]
    for overrides, message in cases:
        with pytest.raises(CheckpointError, match=f"differs from the one checkpointed .*{message}.*--allow-changes"):
            make_trainer(tmp_path, resume=True, **overrides)
    resumed = make_trainer(tmp_path, resume=True, allow_changes=True, data=activations(seed=11))
    assert resumed.step == 3
    with pytest.raises(CheckpointError, match="seed=1 but .* seed=0"):
        make_trainer(tmp_path, resume=True, allow_changes=True, seed=1)


def test_metrics_after_the_checkpoint_are_not_logged_twice(tmp_path):
    trainer = make_trainer(tmp_path)
    for _ in range(6):  # checkpoint at 3, metrics at 2, 4, 6: as if killed after step 6's line
        trainer.train_step()
        if trainer.step % 2 == 0:
            trainer._write_metrics(trainer.collect_metrics(1.0, 2))
        if trainer.step == 3:
            trainer.save_checkpoint()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "fv')  # a line torn by the kill
    make_trainer(tmp_path, resume=True).train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


# ---- checkpoint integrity ----
def committed(folder: Path) -> tuple[Path, dict]:
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    return folder / manifest["tensors"]["file"], manifest


def test_a_damaged_or_incomplete_checkpoint_is_refused_naming_what(tmp_path):
    make_trainer(tmp_path, tokens=16 * 2 * 3).train()
    tensors_path, manifest = committed(tmp_path)
    original = tensors_path.read_bytes()
    flipped = bytearray(original)
    flipped[-5] ^= 0x10  # one bit of tensor data
    tensors_path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=f"{tensors_path.name} does not match the SHA-256"):
        make_trainer(tmp_path, resume=True)
    tensors_path.write_bytes(original)
    for field in ("step", "data_variance"):
        broken = {key: value for key, value in manifest.items() if key != field}
        (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=f"checkpoint.json has no field '{field}'"):
            make_trainer(tmp_path, resume=True)
    (tmp_path / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json is not readable JSON"):
        make_trainer(tmp_path, resume=True)
    tensors = load_file(str(tensors_path))
    del tensors["adam.b_enc.exp_avg"]
    save_file(tensors, str(tensors_path))
    from pyinterp._atomic import sha256_of_file
    manifest["tensors"]["sha256"] = sha256_of_file(tensors_path)
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="no tensor 'adam.b_enc.exp_avg'"):
        make_trainer(tmp_path, resume=True)


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    make_trainer(tmp_path, tokens=16 * 2 * 3).train()
    dead_pid = os.fork()
    if dead_pid == 0:
        os._exit(0)
    os.waitpid(dead_pid, 0)
    stale = [tmp_path / f".checkpoint.json.tmp-{dead_pid}", tmp_path / f".x.safetensors.tmp-{dead_pid}",
             tmp_path / "checkpoint-000000002-deadbeef.safetensors"]
    live = tmp_path / f".checkpoint.json.tmp-{os.getppid()}"  # a writer still running
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    make_trainer(tmp_path, resume=True)
    assert not any(path.exists() for path in stale) and live.exists()


# ---- kill -9 inside checkpoint writes ----
KILL_RUN = dict(tokens=16 * 2 * 8, checkpoint_every=3)  # checkpoints at 3, 6, 8, then the SAE


def fault_run(out: str, resume: bool) -> None:
    """The run the kill tests kill (in a child) and finish (here)."""
    make_trainer(Path(out), resume=resume, **KILL_RUN).train()


def result_of(folder: Path) -> tuple[dict, list]:
    tensors, _ = checkpoint.read_checkpoint(folder)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return tensors, [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    fault_run(str(folder), False)
    return result_of(folder)


# Atomic writes in order: 1, 2 = checkpoint 3 (tensors, manifest); 3, 4 = checkpoint 6; 5, 6 =
# checkpoint 8; 7, 8 = sae.safetensors, cfg.json.
@pytest.mark.parametrize("kill_at", ["train-step:5", "atomic-written:3", "atomic-renamed:3", "atomic-written:4",
                                     "atomic-renamed:4", "checkpoint-committed:2", "atomic-written:6",
                                     "atomic-renamed:7", "atomic-written:8"])
def test_killed_inside_a_write_resumes_to_the_uninterrupted_run(tmp_path, kill_at, uninterrupted):
    pid = os.fork()  # a child with everything imported already: the kill costs no start-up
    if pid == 0:
        try:
            os.environ["PYINTERP_KILL_AT"] = kill_at
            fault_run(str(tmp_path), False)
        finally:
            os._exit(3)  # not reached when the kill point fires
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    fault_run(str(tmp_path), resume=True)
    tensors, metrics = result_of(tmp_path)
    assert_same(uninterrupted[0], tensors)
    assert metrics == uninterrupted[1]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("checkpoint-")) == [
        "cfg.json", "checkpoint.json", "metrics.jsonl", "sae.safetensors"]
    assert len(list(tmp_path.glob("checkpoint-*"))) == 1
    TopKSAE.load(tmp_path)


# ---- one rank killed under torchrun ----
def torchrun(out: Path, shards: Path, *extra, kill_at=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pyinterp", "train-sae", "--shards", str(shards), "--out", str(out), "--backend", "torch",
               "--device", "cpu", "--latents", str(LATENTS), "--k", str(K), "--tokens", str(16 * 2 * 8),
               "--batch-size", "16", "--log-every", "2", "--checkpoint-every", "3", "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYINTERP_KILL_AT", None)
    if kill_at:
        env["PYINTERP_KILL_AT"] = kill_at
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("parallel", ["ddp", "latents"])
def test_a_rank_killed_under_torchrun_ends_the_job_and_leaves_a_resumable_checkpoint(tmp_path, parallel):
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"activations": activations()}, str(shards / "0.safetensors"))
    killed = torchrun(tmp_path / "out", shards, "--parallel", parallel, kill_at="train-step:5@1")
    output = killed.stdout + killed.stderr
    assert killed.returncode != 0 and "SIGKILL" in output, output[-3000:]
    _, state = checkpoint.read_checkpoint(tmp_path / "out")
    assert state["step"] == 3  # the last one committed before the kill at step 5
    resumed = torchrun(tmp_path / "out", shards, "--parallel", parallel, "--resume")
    assert resumed.returncode == 0 and "done: step" in resumed.stdout, (resumed.stdout + resumed.stderr)[-3000:]
    straight = torchrun(tmp_path / "straight", shards, "--parallel", parallel)
    assert straight.returncode == 0, straight.stderr[-3000:]
    tensors_resumed, metrics_resumed = result_of(tmp_path / "out")
    tensors_straight, metrics_straight = result_of(tmp_path / "straight")
    assert_same(tensors_straight, tensors_resumed)
    assert metrics_resumed == metrics_straight
