"""benches/gpu_check.sh: its dry run on this machine (the script is tested before a GPU exists), and
the check that a CUDA host really has the cuda and triton backends (a failed _C_cuda load or a
missing triton would otherwise only drop a backend)."""
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest
import torch

import pyinterp
from pyinterp import _extension
from pyinterp.vsa import random_codebooks, random_problems, resonator

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_leaves_one_archive_with_every_stage_log(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    run = subprocess.run([str(ROOT / "benches" / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == ["gpu-check.tar.gz"]
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        names = {pathlib.PurePosixPath(n).as_posix().removeprefix("./") for n in archive.getnames()}
        summary = archive.extractfile("./summary.txt").read().decode()
        logs = {pathlib.PurePosixPath(n).name.split("-", 1)[1].removesuffix(".log"):
                archive.extractfile(n).read().decode()
                for n in archive.getnames() if n.startswith("./logs/") and n.endswith(".log")}
    assert {"summary.txt", "device.txt", "bench.jsonl"} <= names
    stages = ["device", "install", "available", "gpu-tests", "kernels", "memcheck", "racecheck",
              "synccheck", "initcheck", "sanitize-cases", "bench", "train"]
    assert sorted(logs) == sorted(stages)
    for stage in ("memcheck", "racecheck", "synccheck", "initcheck", "gpu-tests"):
        assert logs[stage].startswith("skipped: needs a GPU"), stage
    for stage in ("device", "install", "available", "kernels", "sanitize-cases", "bench", "train"):
        assert f"{stage:<15} ok" in summary, summary
    assert " 0/" not in logs["sanitize-cases"] and "FAIL" not in logs["sanitize-cases"]
    assert "cases passed" in logs["sanitize-cases"] and "cases passed" in logs["kernels"]
    assert "exit status 0" in summary
    # no temporary folder is left behind
    assert not list(tmp_path.glob("gpu-check.*"))


def test_a_failing_stage_is_reported_and_still_archived(tmp_path):
    out = tmp_path / "out"
    # A Python that cannot run anything: every stage that uses it fails, the archive is still written.
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    env = {**os.environ, "PYTHON": str(broken), "TMPDIR": str(tmp_path), "GPU_CHECK_BUDGET_S": "60"}
    run = subprocess.run([str(ROOT / "benches" / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        summary = archive.extractfile("./summary.txt").read().decode()
    assert "FAILED (exit 3)" in summary and "exit status 1" in summary


@pytest.mark.gpu
def test_cuda_and_triton_backends_are_available_on_a_cuda_host():
    assert _extension.cuda_extension() is not None, _extension.load_error("_C_cuda")
    x = torch.randn(8, 32, device="cuda")
    W = torch.randn(64, 32, device="cuda")
    books = random_codebooks([8, 8], 64, seed=0, device="cuda")
    s, truth = random_problems(books, 4, seed=1)
    for backend in ("cuda", "triton"):
        values, indices = pyinterp.topk_encode(x, W, None, 4, backend=backend)
        decoded = pyinterp.sparse_decode(values, indices, W, backend=backend)
        P, _ = pyinterp.ij_accumulate(torch.randn(2, 3, 4, 5, device="cuda"), torch.ones(2, device="cuda"),
                                      torch.randn(4, 5, device="cuda"), backend=backend)
        found = resonator(s, books, max_iters=20, backend=backend)
        assert decoded.shape == (8, 32) and P.shape == (3, 4) and found.indices.shape == truth.shape
