"""Streaming multi-hookpoint training: the buffer shuffle, streaming equal to the same rows from memory,
the multi-hookpoint run equal to separate single-hookpoint runs, and resume."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pyinterp import models
from pyinterp.sae import corpus, hookpoints, stream
from pyinterp.sae.trainer import TrainConfig, Trainer, build_sae

from test_sae_cache import TEXTS, tiny_model, write_corpus

CONFIG = TrainConfig(tokens=96 * 12, batch_size=96, log_every=4, checkpoint_every=6, progress=False,
                     dead_after_tokens=300,
                     precision="fp32")


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_default_model().tokenizer


def test_buffer_shuffle_is_a_pure_function_of_seed_and_rows_and_uses_each_row_once():
    rows = torch.arange(1000, dtype=torch.float32)[:, None]
    blocks = lambda: (rows[i:i + 37] for i in range(0, 1000, 37))  # noqa: E731
    first = stream.BufferShuffle(blocks(), 50, 200, seed=3)
    batches = [first.next_batch() for _ in range(20)]
    again = stream.BufferShuffle(blocks(), 50, 200, seed=3)
    assert all(torch.equal(a, again.next_batch()) for a in batches)
    seen = torch.cat(batches).flatten()
    assert seen.unique().numel() == 1000  # 20 x 50 rows: every row exactly once
    other = stream.BufferShuffle(blocks(), 50, 200, seed=4)
    assert not torch.equal(other.next_batch(), batches[0])
    with pytest.raises(ValueError, match="buffer_tokens=10 must be at least batch_size=50"):
        stream.BufferShuffle(blocks(), 50, 10, seed=0)


def sources_for(tokenizer, model, path, names, seed=0):
    points = hookpoints.resolve(model, names)
    return stream.streamed_sources(model, tokenizer, str(path), points, batch_size=CONFIG.batch_size,
                                   seed=seed, context_length=13, exclude_first=True, buffer_tokens=400,
                                   batch_windows=4)


def test_streaming_equals_the_same_rows_from_memory(tmp_path, tokenizer):
    model = tiny_model("gpt2", tokenizer.vocab_size)
    path = write_corpus(tmp_path, "txt")
    names = ["transformer.h.0", "transformer.h.2.mlp"]
    sources = sources_for(tokenizer, model, path, names)
    points = hookpoints.resolve(model, names)
    windows = list(corpus.context_windows(corpus.documents(path), tokenizer, 13))
    blocks = []
    for start in range(0, len(windows), 4):
        acts = hookpoints.capture(model, points, input_ids=torch.stack(windows[start:start + 4]))
        blocks.append(torch.cat([a[:, 1:].reshape(-1, 16) for a in acts.values()], dim=1))
    memory = stream.BufferShuffle(iter(blocks * 3), CONFIG.batch_size, 400, seed=0)
    for index in range(10):
        expected = memory.next_batch()
        for column, name in enumerate(names):
            got = sources[name].batch(index)
            torch.testing.assert_close(got, expected[:, 16 * column:16 * (column + 1)])


def make_trainer(tmp_path, config=CONFIG, resume=False):
    def make(name, source):
        sae = build_sae("topk", source.d_model, 64, 4, backend="cpu")
        return Trainer(sae, source, config, tmp_path / name, resume=resume)
    return make


def test_multi_hookpoint_run_equals_separate_runs_and_resume_equals_uninterrupted(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = tiny_model("llama", tokenizer.vocab_size)
    path = write_corpus(tmp_path, "jsonl")
    names = ["model.layers.0", "model.layers.1.mlp"]
    together = stream.train_streaming(sources_for(tokenizer, model, path, names), make_trainer(tmp_path / "both"))
    for name in names:
        alone = stream.train_streaming(sources_for(tokenizer, model, path, [name]), make_trainer(tmp_path / "one"))
        assert together[name]["fvu"] == alone[name]["fvu"]
        a = load_file(str(tmp_path / "both" / name / "sae.safetensors"))
        b = load_file(str(tmp_path / "one" / name / "sae.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a)
    # Half the run, then a resume to the end: the same SAEs as the straight run.
    half = dataclasses.replace(CONFIG, tokens=CONFIG.tokens // 2)
    stream.train_streaming(sources_for(tokenizer, model, path, names), make_trainer(tmp_path / "resumed", half))
    stream.train_streaming(sources_for(tokenizer, model, path, names),
                           make_trainer(tmp_path / "resumed", resume=True))
    for name in names:
        a = load_file(str(tmp_path / "both" / name / "sae.safetensors"))
        b = load_file(str(tmp_path / "resumed" / name / "sae.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("skip_connection", [False, True])
def test_transcoder_of_an_mlp_learns_and_round_trips(tmp_path, tokenizer, skip_connection):
    from pyinterp.nn import TopKTranscoder

    model = tiny_model("llama", tokenizer.vocab_size)
    path = write_corpus(tmp_path, "txt")
    sources = sources_for(tokenizer, model, path, ["model.layers.1.mlp:input", "model.layers.1.mlp"])
    paired = sources["model.layers.1.mlp:input"].paired_with(sources["model.layers.1.mlp"])
    config = dataclasses.replace(CONFIG, tokens=96 * 40, log_every=5, lr=3e-3)
    fvus = []

    def make(name, source):
        transcoder = TopKTranscoder(16, 16, 64, 6, skip_connection=skip_connection, backend="cpu")
        trainer = Trainer(transcoder, source, config, tmp_path / "tc")
        original = trainer._write_metrics
        trainer._write_metrics = lambda metrics: (fvus.append(metrics["fvu"]), original(metrics))
        return trainer

    stream.train_streaming({"mlp": paired}, make)
    assert fvus[-1] < 0.8 * fvus[0]
    loaded = TopKTranscoder.load(tmp_path / "tc", backend="torch")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["skip_connection"] is skip_connection
    x = torch.randn(5, 16)
    assert loaded.transcode(x).shape == (5, 16) and (loaded.W_skip is not None) == skip_connection
    with pytest.raises(ValueError, match="not a transcoder"):
        from pyinterp.nn import TopKSAE

        TopKSAE(16, 32, 4).save(tmp_path / "plain")
        TopKTranscoder.load(tmp_path / "plain")


def test_cli_streams_several_hookpoints_and_a_transcoder_then_evaluates(tmp_path, tokenizer, capsys):
    from pyinterp import cli

    model = tiny_model("llama", tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = write_corpus(tmp_path, "parquet")
    common = ["train-sae", "--model", str(tmp_path / "model"), "--corpus", str(path), "--latents", "32",
              "--k", "4", "--tokens", "960", "--batch-size", "96", "--context-length", "13", "--backend", "cpu",
              "--buffer-tokens", "400", "--log-every", "5", "--out", str(tmp_path / "out")]
    assert cli.main(common + ["--layers", "1-2", "--transcode", "model.layers.1.mlp:input=model.layers.1.mlp"]) == 0
    printed = capsys.readouterr().out
    assert "tok/s of the pipeline" in printed and "model forward" in printed
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 10_000
    for folder in ("model.layers.0", "model.layers.1", "model.layers.1.mlp-input=model.layers.1.mlp"):
        assert (tmp_path / "out" / folder / "sae.safetensors").is_file()
    assert cli.main(["eval-sae", "--model", str(tmp_path / "model"), "--corpus", str(path), "--windows", "4",
                     "--context-length", "13", "--sae", f"model.layers.1={tmp_path / 'out' / 'model.layers.1'}"]) == 0
    assert "delta_ce" in capsys.readouterr().out
    assert cli.main(common + ["--hookpoints", "model.layerz.1"]) == 2
    assert "close: model.layers.1" in capsys.readouterr().err
    assert cli.main(common[:-2] + ["--out", str(tmp_path / "o2")]) == 2
    assert "--corpus needs --hookpoints" in capsys.readouterr().err


def test_torchrun_spreads_hookpoints_over_ranks_and_equals_one_process(tmp_path, tokenizer):
    import os
    import subprocess
    import sys

    model = tiny_model("gpt2", tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = write_corpus(tmp_path, "txt")
    args = ["-m", "pyinterp", "train-sae", "--model", str(tmp_path / "model"), "--corpus", str(path),
            "--layers", "1-3", "--latents", "32", "--k", "4", "--tokens", "480", "--batch-size", "96",
            "--context-length", "13", "--backend", "cpu", "--buffer-tokens", "300", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, check=True,
                   capture_output=True)
    import socket

    with socket.socket() as probe:  # a free port for torchrun's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-addr", "127.0.0.1", "--master-port", str(port), *args,
                            "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True)
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert "rank 0: streaming" in ranks.stdout and "rank 1: streaming" in ranks.stdout
    for folder in ("transformer.h.0", "transformer.h.1", "transformer.h.2"):
        one = (tmp_path / "one" / folder / "sae.safetensors").read_bytes()
        assert one == (tmp_path / "two" / folder / "sae.safetensors").read_bytes()


def test_tensorboard_sink_gets_every_logged_line_and_a_missing_package_is_named(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyinterp.sae import sinks
    from pyinterp.sae.data import TensorSource

    source = TensorSource(torch.randn(600, 8, generator=torch.Generator().manual_seed(0)))
    config = dataclasses.replace(CONFIG, tokens=600, batch_size=60, log_every=2)
    trainer = Trainer(build_sae("topk", 8, 16, 2, backend="torch"), source, config, tmp_path,
                      sinks=sinks.make_sinks(["tensorboard"], tmp_path, "run"))
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "run"))
    events.Reload()
    fvu = [event.value for event in events.Scalars("fvu")]
    logged = [json.loads(line)["fvu"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert fvu == pytest.approx(logged) and len(fvu) == 5
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sinks.MissingPackageError, match="--log-to wandb needs the wandb package"):
        sinks.check_sinks(["wandb"])
    with pytest.raises(ValueError, match="--log-to must name"):
        sinks.check_sinks(["csv"])



STREAM_RUN = ["--layers", "1-2", "--latents", "32", "--k", "4", "--tokens", "960", "--batch-size", "96",
              "--context-length", "13", "--backend", "cpu", "--buffer-tokens", "300", "--log-every", "2",
              "--checkpoint-every", "3", "--no-progress"]  # two SAEs, checkpoints at steps 3, 6, 9 of 10


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, tokenizer):
    """(model folder, corpus, the uninterrupted run's --out) of STREAM_RUN on a tiny GPT-2."""
    folder = tmp_path_factory.mktemp("streamed")
    model = tiny_model("gpt2", tokenizer.vocab_size)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    path = write_corpus(folder, "txt")
    straight = _train_sae(folder / "model", path, folder / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    return folder / "model", path, folder / "straight"


def _train_sae(model_folder, corpus_path, out, *extra, kill_at=None):
    """`pyinterp train-sae --corpus` (STREAM_RUN) in a child process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "PYINTERP_KILL_AT"):
        env.pop(name, None)
    if kill_at:
        env["PYINTERP_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "pyinterp", "train-sae", "--model", str(model_folder), "--corpus",
               str(corpus_path), *STREAM_RUN, "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def _run_result(out) -> dict:
    result = {}
    for folder in ("transformer.h.0", "transformer.h.1"):
        lines = [json.loads(line) for line in (out / folder / "metrics.jsonl").read_text().splitlines()]
        result[folder] = ((out / folder / "sae.safetensors").read_bytes(),
                          [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines])
    return result


def test_streaming_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, streamed_run):
    import signal

    model_folder, path, straight = streamed_run
    # Killed as the first checkpoint (step 3 of one SAE) is committed: the other SAE has usually none
    # yet (its own commit may just have landed too) and then starts again from step 0 on resume (its
    # metrics of steps 1-2 dropped), the first from step 3.
    killed = _train_sae(model_folder, path, tmp_path, kill_at="checkpoint-committed:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    steps = [json.loads(p.read_text())["step"] for p in tmp_path.glob("*/checkpoint.json")]
    assert steps and set(steps) == {3} and not (tmp_path / "transformer.h.0" / "sae.safetensors").exists()
    resumed = _train_sae(model_folder, path, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _run_result(tmp_path) == _run_result(straight)


def test_streaming_resume_with_more_tokens_keeps_the_checkpoints_dead_after_tokens(tmp_path, streamed_run, capsys):
    import shutil

    from pyinterp import cli

    model_folder, path, straight = streamed_run
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    common = ["train-sae", "--model", str(model_folder), "--corpus", str(path), *STREAM_RUN, "--out", str(out),
              "--resume"]
    manifest = out / "transformer.h.0" / "checkpoint.json"
    state = json.loads(manifest.read_text())
    assert state["step"] == 10 and state["dead_after_tokens"] == 96  # the default: tokens / 10
    assert cli.main(common + ["--tokens", "1920"]) == 0
    state = json.loads(manifest.read_text())
    # Continued to the new total with the dead-latent horizon its first 10 steps had (not the new
    # default 192, which would change mid-run what counts as dead).
    assert state["step"] == 20 and state["dead_after_tokens"] == 96
    capsys.readouterr()
    assert cli.main(common + ["--tokens", "2880", "--dead-after-tokens", "500"]) == 2
    assert "dead_after_tokens: 96 in the checkpoint, 500 now" in capsys.readouterr().err


def test_device_map_is_passed_to_transformers_and_a_missing_accelerate_is_named(tmp_path, streamed_run, capsys,
                                                                                 monkeypatch):
    import importlib.util

    from pyinterp import cli
    from pyinterp.sae.cache import load_model

    import transformers

    model_folder, path, _ = streamed_run
    asked, from_pretrained = [], transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **options: (asked.append(options.get("device_map")),
                                                  from_pretrained(*args, **options))[1])
    model, _, _ = load_model(str(model_folder), device_map="auto")
    assert asked == ["auto"] and next(model.parameters()).device.type == "cpu"  # all of it fits the CPU
    assert [p.name for p in hookpoints.resolve(model, layers="1-2")] == ["transformer.h.0", "transformer.h.1"]
    command = ["train-sae", "--model", str(model_folder), "--corpus", str(path), *STREAM_RUN, "--tokens", "192",
               "--device-map", "auto"]
    assert cli.main(command + ["--out", str(tmp_path / "mapped")]) == 0
    assert asked == ["auto", "auto"]
    assert (tmp_path / "mapped" / "transformer.h.1" / "sae.safetensors").is_file()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "accelerate" else find_spec(name, *rest))
    capsys.readouterr()
    assert cli.main(command + ["--out", str(tmp_path / "unmapped")]) == 2
    assert "--device-map auto needs the accelerate package" in capsys.readouterr().err
    with pytest.raises(ValueError, match="applies to a Hugging Face model"):
        load_model("default", device_map="auto")
