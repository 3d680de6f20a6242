"""Every CLI mistake ends with `pyinterp COMMAND: error: ...` naming the flag and exit status 2,
before any work (a run failure after work has started: status 1), never a traceback or a silent
default."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pyinterp import _atomic
from pyinterp.cli import main
from pyinterp.nn import TopKSAE

torch.set_num_threads(1)


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err


@pytest.fixture()
def shards(tmp_path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"activations": torch.randn(600, 12, generator=g) + 1}, str(folder / "0.safetensors"))
    return folder


def train_args(shards: Path, out: Path, *extra) -> list[str]:
    return ["train-sae", "--shards", str(shards), "--out", str(out), "--latents", "32", "--k", "4",
            "--tokens", "512", "--batch-size", "64", "--backend", "torch", "--device", "cpu", "--no-progress",
            "--log-every", "2", "--checkpoint-every", "4", *extra]


TRAIN_BAD_FLAGS = [
    (("--tokens", "0"), "--tokens: must be >= 1, got 0"), (("--latents", "0"), "--latents"),
    (("--k", "0"), "--k"), (("--k", "x"), "expected an integer"), (("--batch-size", "1"), "--batch-size"),
    (("--grad-accumulation", "0"), "--grad-accumulation"), (("--lr", "0"), "--lr"), (("--lr", "nan"), "--lr"),
    (("--lr", "-1"), "--lr"), (("--dead-after-tokens", "0"), "--dead-after-tokens: must be >= 1"),
    (("--log-every", "0"), "--log-every"), (("--checkpoint-every", "-1"), "--checkpoint-every"),
    (("--seed", "-1"), "--seed"), (("--aux-alpha", "-1"), "--aux-alpha"), (("--aux-alpha", "inf"), "--aux-alpha"),
    (("--k-aux", "-1"), "--k-aux"), (("--texts", "0"), "--texts"), (("--precision", "fp8"), "--precision"),
    (("--parallel", "pipe"), "--parallel"), (("--nonfinite", "ignore"), "--nonfinite"),
    (("--architecture", "relu"), "--architecture"),
    (("--backend", "foo"), "--backend foo: .*unknown backend"), (("--device", "cuda"), "--device cuda: this machine has no CUDA"),
    (("--device", "toaster"), "--device 'toaster' is not a device"), (("--k", "64"), "--k 64 is more than --latents 32"),
    (("--k-aux", "64"), "--k-aux 64 is more than --latents 32"), (("--allow-changes",), "--allow-changes only applies with --resume"),
    (("--resume",), "--resume: no checkpoint in"),
]


@pytest.mark.parametrize("extra, message", TRAIN_BAD_FLAGS, ids=[" ".join(e) for e, _ in TRAIN_BAD_FLAGS])
def test_train_sae_rejects_bad_arguments_up_front(capsys, tmp_path, shards, extra, message):
    if extra == ("--device", "cuda") and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "out"), *extra)
    assert status == 2
    assert err.startswith("usage:") or err.startswith("pyinterp train-sae: error:"), err
    assert "pyinterp train-sae: error:" in err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "checkpoint.json").exists()


def test_train_sae_rejects_unusable_out_folders(capsys, tmp_path, shards, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "a-file"))
    assert status == 2 and "--out" in err and "is a file, not a folder" in err
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "a-file" / "below"))
    assert status == 2 and "is not writable" in err
    # A folder even root cannot write to (sysfs); a read-only bind mount or chmod gives the same error.
    status, err = run_cli(capsys, *train_args(shards, Path("/sys/pyinterp-test-out")))
    assert status == 2 and "--out /sys/pyinterp-test-out is not writable" in err
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "out", "--shards", str(tmp_path / "none")))
    assert status == 2 and "is not a folder" in err
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "out"))
    assert status == 2 and "MiB free, but the checkpoints and the SAE need" in err


def test_train_sae_reports_a_full_disk_mid_run_and_keeps_the_checkpoint(capsys, tmp_path, shards, monkeypatch):
    real_write = _atomic.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(_atomic, "save_file", full_disk)
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "out"))
    assert status == 1 and "step 8: writing to" in err and "No space left on device" in err
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]
    status, _ = run_cli(capsys, *train_args(shards, tmp_path / "out", "--resume"))
    assert status == 0 and TopKSAE.load(tmp_path / "out").n_latents == 32


def test_train_sae_stops_on_nan_shards_with_an_error(capsys, tmp_path, shards):
    g = torch.Generator().manual_seed(1)
    bad = torch.randn(600, 12, generator=g)
    bad[::7] = float("nan")
    save_file({"activations": bad}, str(shards / "1.safetensors"))
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "out"))
    assert status in (1, 2) and "pyinterp train-sae: error:" in err and "non-finite" in err
    assert not (tmp_path / "out" / "sae.safetensors").exists()


def test_train_sae_resumes_a_finished_run_and_refuses_fewer_tokens(capsys, tmp_path, shards):
    assert run_cli(capsys, *train_args(shards, tmp_path / "out"))[0] == 0
    assert main(train_args(shards, tmp_path / "out", "--resume")) == 0
    assert "already finished at step 8" in capsys.readouterr().out
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "out", "--resume", "--tokens", "128"))
    assert status == 2 and "past the 2 steps of tokens=128" in err
    status, err = run_cli(capsys, *train_args(shards, tmp_path / "out", "--resume", "--precision", "bf16"))
    assert status == 2 and "precision: 'fp32' in the checkpoint, 'bf16' now" in err


FACTORIZE_BAD_FLAGS = [
    (("--dim", "0"), "--dim"), (("--factors", "0"), "--factors"), (("--codebook", "0"), "--codebook"),
    (("--problems", "0"), "--problems: must be >= 1"), (("--max-iters", "0"), "--max-iters: must be >= 1"),
    (("--update", "random"), "--update"), (("--weights", "pinv"), "--weights"), (("--activation", "relu"), "--activation"),
    (("--beta", "0"), "--beta"), (("--beta", "nan"), "--beta"), (("--threshold", "nan"), "--threshold"),
    (("--k", "0"), "--k"), (("--k", "100"), "--k 100 is more than --codebook 8"), (("--noise", "-1"), "--noise"),
    (("--stop", "never"), "--stop"), (("--theta", "inf"), "--theta"), (("--detect-cycles", "-1"), "--detect-cycles"),
    (("--detect-cycles", "1"), "detect_cycles must be 0"), (("--seed", "-1"), "--seed"), (("--backend", "gpu"), "--backend"),
    (("--device", "cuda"), "--device cuda: this machine has no CUDA"), (("--device", "toaster"), "not a device"),
    (("--sizes", "4"), "--sizes only applies with --capacity"), (("--capacity", "--sizes", "0"), "--sizes"),
    (("--capacity", "--trials", "0"), "--trials"), (("--cap", "forever"), "--cap"), (("--cap", "0"), "--cap"),
    (("--out", "plot.png"), "--out .* only applies with --capacity"),
    (("--capacity", "--out", "missing_dir/plot.png"), "the folder missing_dir does not exist"),
    (("--capacity", "--out", "plot.txt"), "must end in .png"), (("--capacity", "--max-iters", "5"), "--max-iters does not apply"),
    (("--activation", "attention"), "needs beta"), (("--activation", "threshold"), "needs threshold"),
    (("--activation", "topk"), "needs k"), (("--stop", "similarity"), "needs theta"),
]


@pytest.mark.parametrize("extra, message", FACTORIZE_BAD_FLAGS, ids=[" ".join(e) for e, _ in FACTORIZE_BAD_FLAGS])
def test_factorize_rejects_bad_arguments(capsys, extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    status, err = run_cli(capsys, "factorize", "--dim", "64", "--codebook", "8", "--problems", "4", *extra)
    assert status == 2 and "pyinterp factorize: error:" in err and re.search(message, err), err


def test_factorize_max_iters_is_used_as_given(capsys):
    assert main(["factorize", "--dim", "64", "--codebook", "8", "--problems", "4", "--max-iters", "1"]) == 0
    assert "max_iters=1" in capsys.readouterr().out


def test_attribute_and_demo_reject_bad_arguments_before_the_work(capsys, tmp_path):
    status, err = run_cli(capsys, "attribute", "a", "b", "--out", str(tmp_path / "missing_dir" / "x.png"))
    assert status == 2 and "pyinterp attribute: error: --out" in err and "does not exist" in err
    status, err = run_cli(capsys, "attribute", "a", "b", "--steps", "0")
    assert status == 2 and "--steps" in err
    status, err = run_cli(capsys, "demo", "--texts", "0")
    assert status == 2 and "--texts: must be >= 1, got 0" in err


def test_sae_load_names_the_damaged_file(tmp_path):
    TopKSAE(12, 32, 4).save(tmp_path)
    weights = (tmp_path / "sae.safetensors").read_bytes()
    (tmp_path / "sae.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"sae\.safetensors: not a readable safetensors file"):
        TopKSAE.load(tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(weights)
    for text, message in [("{trunc", "cfg.json: not a readable JSON"), ("[1, 2]", "cfg.json: expected a JSON object"),
                          ('{"k": 0}', "cfg.json: .*k must be in"), ('{"k": 4, "pyinterp": 3}', "'pyinterp' must be")]:
        (tmp_path / "cfg.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            TopKSAE.load(tmp_path)
