"""The SAE benchmark shapes of docs/sae.md ("Benchmark shapes") and what the SAE benches share: which providers run here, the
provider functions, the timed step of a direction, and the interleaved measurement of one case."""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import pytest
import torch

import harness
from pyinterp import _dispatch

# name: (D, M, k, N)
DEMO_SHAPES = {"cpu-demo": (384, 4096, 32, 1024)}
SMALL_SHAPES = {"cpu-small": (384, 16384, 32, 4096)}
PAPER_SHAPES = {
    "gpt2-32k": (768, 32768, 32, 16384),
    "gemma2b-64k": (2304, 65536, 64, 8192),
    "llama8b-128k-k32": (4096, 131072, 32, 8192),
    "llama8b-128k-k192": (4096, 131072, 192, 8192),
    "wide-1m": (4096, 1048576, 64, 4096),
}
ALL_SHAPES = {**DEMO_SHAPES, **SMALL_SHAPES, **PAPER_SHAPES}
# --shapes option -> the shape sets it runs
SHAPE_SETS = {"demo": DEMO_SHAPES, "small": SMALL_SHAPES, "paper": PAPER_SHAPES,
              "all": {**SMALL_SHAPES, **PAPER_SHAPES}}
DIRECTIONS = ("forward", "forward+backward")


def bench_device() -> str:
    """PYINTERP_BENCH_DEVICE (set by `pyinterp bench --device`), else the GPU when there is one."""
    return os.environ.get("PYINTERP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


if bench_device() == "cpu":
    # sparsify reads this once, at its import (whichever bench imports it first): its Triton decoder
    # needs a GPU.
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")


def skip_reason(provider: str, shape: str, device: str, option: str) -> str:
    if shape in PAPER_SHAPES and device != "cuda":
        return "paper shapes need a GPU"
    if provider == "torch-compile" and option == "demo" and device == "cpu":
        return "compiling takes half a minute here: in `pyinterp bench` only"
    if provider.startswith("pyinterp-"):
        reason = _dispatch.unavailable_reason(provider.removeprefix("pyinterp-"), torch.device(device))
        if provider == "pyinterp-triton" and device == "cpu" and not reason:
            reason = "the Triton interpreter is a correctness tool, not a benchmark target"
        return reason
    peer_packages = {"sparsify": ("sparsify", "eai-sparsify"), "saelens": ("sae_lens", "sae-lens")}
    if provider in peer_packages and importlib.util.find_spec(peer_packages[provider][0]) is None:
        return f"{peer_packages[provider][1]} is not installed (`make setup` installs the pinned peers, requirements-peers*.txt)"
    return ""


def bench_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class SaeCase(NamedTuple):
    row: dict
    providers: tuple[str, ...]  # those that run here
    width: int
    latents: int
    k: int
    tokens: int
    dtype: torch.dtype
    device: str
    rounds: dict                # harness.round_settings of the run
    label: str


def sae_case(op: str, request, record, shape: str, direction: str, providers, *,
             slow: frozenset = frozenset()) -> SaeCase:
    """The case's results row and sizes, and the providers that run here; records a skipped row (with
    why) for each other one, and skips the case when none runs. `slow` providers run in the full run only."""
    option = request.config.getoption("--shapes")
    if shape not in SHAPE_SETS[option]:
        pytest.skip(f"--shapes={option}")
    device = bench_device()
    width, latents, k, tokens = ALL_SHAPES[shape]
    dtype = bench_dtype(device)
    row = {"op": op, "shape": shape, "N": tokens, "D": width, "M": latents, "k": k,
           "dtype": str(dtype).removeprefix("torch."), "direction": direction, "device_kind": device}
    running = []
    for provider in providers:
        reason = skip_reason(provider, shape, device, option)
        if not reason and provider in slow and not harness.is_full_run(request.config):
            reason = harness.SLOW_REASON
        if reason:
            record({**row, "provider": provider, "skipped": reason})
        else:
            running.append(provider)
    if not running:
        pytest.skip("no provider runs here")
    return SaeCase(row, tuple(running), width, latents, k, tokens, dtype, device,
                   harness.round_settings(request.config), f"{op} {shape} {direction}")


def provider_function(provider: str, pyinterp_op, eager, sparsify):
    """The function a provider times: pyinterp_op(..., backend=<backend>) for pyinterp-<backend>,
    torch.compile of the eager torch function, sparsify's, or the eager one."""
    if provider.startswith("pyinterp-"):
        return functools.partial(pyinterp_op, backend=provider.removeprefix("pyinterp-"))
    if provider == "torch-compile":
        return torch.compile(eager)
    if provider == "sparsify":
        return sparsify
    return eager


def parameters_for(direction: str, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters, made to require gradients when the direction has a backward."""
    if direction == "forward+backward":
        for p in params:
            p.requires_grad_()
    return params


def direction_step(direction: str, run, params: list[torch.Tensor], grad_output: torch.Tensor, device: str):
    """One timed step of a direction: run() without autograd (forward), or run() and its backward of
    grad_output into params, whose gradients are then dropped (forward+backward)."""
    if direction == "forward+backward":
        def step():
            torch.autograd.backward(run(), grad_output)
            for p in params:
                p.grad = None
            synchronize(device)
    else:
        def step():
            with torch.no_grad():
                run()
            synchronize(device)
    return step


def measure_and_record(case: SaeCase, steps: dict, record, progress, *, work: float, unit: str,
                       extra: dict[str, dict] | None = None) -> dict:
    """Times the providers' steps in interleaved rounds (harness.measure_case) and records a row per
    provider with throughput = work / median time in `unit` (TFLOP/s: work in FLOPs; GB/s: bytes;
    tok/s: tokens), updated by extra[provider] where given (e.g. peaks measured elsewhere). Returns
    the measurements."""
    measured = harness.measure_case(steps, case.device, label=case.label, progress=progress, **case.rounds)
    for provider, stats in measured.items():
        row = harness.measured_row({**case.row, "provider": provider}, stats, work=work, unit=unit)
        record({**row, **(extra or {}).get(provider, {})})
    return measured


def sparsify_training(x, latents: int, k: int, dead_mask, *, aux_alpha: float):
    """(sae, step): EleutherAI sparsify's SparseCoder trained as its Trainer does (forward with
    AuxK, backward, gradient projection, fused Adam, decoder renorm)."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=latents, k=k), device=x.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step():
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + aux_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return sae, step


def saelens_training(sae, x, *, coefficients: dict, dead_mask):
    """step() of a SAELens training SAE driven as its SAETrainer._train_step does: the training forward
    (with its own losses), the firing bookkeeping, backward, grad-norm clipping, Adam."""
    from sae_lens.saes.sae import TrainStepInput

    device = x.device.type
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(sae.cfg.d_sae, device=x.device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients,
                                                           dead_neuron_mask=dead_mask, n_training_steps=0,
                                                           is_logging_step=False))
            with torch.no_grad():
                since_fired.add_(1)
                since_fired[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return step
