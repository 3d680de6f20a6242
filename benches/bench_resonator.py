"""Resonator-network search: problems solved per second (B problems to their stop / wall time).

Shapes from docs/resonator.md ("Measured") / issue 5: F=3, D=1500, M=100 and F=4, D=2000, M=40, B in {1, 64, 1024}, the
baseline rule (sequential, OP, identity, fixed-point stop, cap 0.001 M^F). Providers:
  pyinterp-<backend>  each pyinterp backend that runs here (triton only on a GPU: the CPU interpreter
                      is a correctness tool; torch = the float64 reference, B <= 64 only)
  pytorch-loop        the strongest plain-PyTorch approach, written below: two GEMMs per factor per
                      sweep over the still-active problems (fp32, exact here), boolean indexing drops
                      the converged ones every sweep
  torchhd-loop        torchhd.resonator (one parallel MAP step) in a Python loop, if torch-hd is
                      installed (peers extra)
Every provider but torchhd (a different trajectory) must give pyinterp's answer, so all do the same
work. The providers of a case run in interleaved rounds. Rows go to the shared results file
(benches/results/<device>.jsonl), throughput in problems/s. B=1024, and torchhd and the float64
reference at B=64, take minutes on a CPU: they run in the full run only (not --shapes demo or small);
--shapes demo runs F3 at B=64.
Run: pyinterp bench --ops resonator, or pytest benches/bench_resonator.py [-k "F3 and B1024"]
"""
import importlib.util

import pytest
import torch

import harness
from harness import SLOW_REASON, is_full_run
from pyinterp import _dispatch
from pyinterp.ops.resonator import resonator
from pyinterp.vsa import iteration_cap, random_codebooks, random_problems

SHAPES = {"F3-D1500-M100": (3, 1500, 100), "F4-D2000-M40": (4, 2000, 40)}
BATCHES = (1, 64, pytest.param(1024, marks=pytest.mark.slow))
DEMO_CASE = ("F3-D1500-M100", 64)
PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "pyinterp-torch", "pytorch-loop",
             "torchhd-loop")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytorch_loop(s: torch.Tensor, codebooks: list[torch.Tensor], max_iters: int):
    """Batched GEMMs with active-set masking; returns (indices, iterations, converged)."""
    batch, dim = s.shape
    books = [book.float() for book in codebooks]
    estimates = [torch.where(book.sum(0) >= 0, 1.0, -1.0).expand(batch, dim).clone() for book in books]
    running = s.float().clone()
    for estimate in estimates:
        running *= estimate
    final = [estimate.clone() for estimate in estimates]
    iterations = torch.zeros(batch, dtype=torch.int64, device=s.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=s.device)
    rows = torch.arange(batch, device=s.device)
    for _ in range(max_iters):
        changed = torch.zeros(rows.numel(), dtype=torch.bool, device=s.device)
        for f, book in enumerate(books):
            unbound = running * estimates[f]
            fresh = torch.where((unbound @ book.T) @ book >= 0, 1.0, -1.0)
            changed |= (fresh != estimates[f]).any(1)
            estimates[f] = fresh
            running = unbound * fresh
        iterations[rows] += 1
        done = ~changed
        if bool(done.any()):
            converged[rows[done]] = True
            for f in range(len(books)):
                final[f][rows[done]] = estimates[f][done]
            rows, running = rows[changed], running[changed]
            estimates = [estimate[changed] for estimate in estimates]
            if rows.numel() == 0:
                break
    for f in range(len(books)):
        final[f][rows] = estimates[f]
    indices = torch.stack([(e @ b.T).abs().argmax(1) for e, b in zip(final, books)], 1)
    return indices, iterations, converged


def torchhd_loop(s: torch.Tensor, codebooks: list[torch.Tensor], max_iters: int):
    """torchhd's parallel step, looped until no estimate changes (its sgn(0) = 0 and the parallel rule
    make this a different trajectory: timed, not compared)."""
    import torchhd

    domains = torchhd.MAPTensor(torch.stack(codebooks))
    estimates = torchhd.MAPTensor(torch.stack([torch.where(b.sum(0) >= 0, 1.0, -1.0) for b in codebooks])
                                  .expand(s.shape[0], -1, -1).clone())
    composite = torchhd.MAPTensor(s)
    for _ in range(max_iters):
        fresh = torchhd.resonator(composite, estimates, domains)
        if torch.equal(fresh, estimates):
            break
        estimates = fresh
    return estimates


@pytest.fixture(scope="module")
def problem_sets():
    cache = {}

    def get(shape: str, batch: int):
        if (shape, batch) not in cache:
            factors, dim, size = SHAPES[shape]
            codebooks = random_codebooks([size] * factors, dim, seed=0, device=DEVICE)
            s, targets = random_problems(codebooks, batch, seed=1)
            cap = iteration_cap("kent", size, factors)
            # pyinterp's answer on the fastest backend: every provider must give it
            expected = resonator(s, codebooks, max_iters=cap)
            accuracy = float((expected.indices == targets).all(1).double().mean())
            cache[shape, batch] = (s, codebooks, accuracy, cap, expected)
        return cache[shape, batch]

    return get


def case_row(shape: str, batch: int) -> dict:
    factors, dim, size = SHAPES[shape]
    return {"op": "resonator", "shape": shape, "N": batch, "F": factors, "D": dim, "M": size,
            "dtype": "bipolar", "direction": f"solve B={batch}", "device_kind": DEVICE.type}


def skip_reason(provider: str, batch: int, config) -> str:
    if provider.startswith("pyinterp-"):
        backend = provider.removeprefix("pyinterp-")
        if backend == "triton" and DEVICE.type == "cpu":
            return "triton on CPU runs only under the interpreter (a correctness tool, not timed)"
        if backend == "torch" and batch > 64:
            return "the float64 reference is timed at B <= 64 only"
        if backend == "torch" and batch > 1 and DEVICE.type == "cpu" and not is_full_run(config):
            # measured here at B=64: 1.3-2.8 s a call on a quiet machine, 34-51 s on a loaded one
            return "the float64 reference at B=64 takes seconds to a minute here: in the full run only"
        return _dispatch.unavailable_reason(backend, DEVICE)
    if provider == "torchhd-loop":
        if importlib.util.find_spec("torchhd") is None:
            return "torch-hd is not installed (`make setup` installs the pinned peers, requirements-peers*.txt)"
        if DEVICE.type == "cpu" and batch > 64:
            # Measured here: B=64 at F=3 took 78 s (its loop runs to the cap: the parallel rule with
            # sgn(0) = 0 rarely reaches a fixed point for the whole batch).
            return "timed at B <= 64 on a CPU (B=1024 would take 20-40 min here)"
        if DEVICE.type == "cpu" and batch == 64 and not is_full_run(config):
            return SLOW_REASON
    return ""


def solver(provider: str, s, codebooks, cap):
    if provider == "pytorch-loop":
        return lambda: pytorch_loop(s, codebooks, cap)
    if provider == "torchhd-loop":
        return lambda: torchhd_loop(s, codebooks, cap)
    return lambda: resonator(s, codebooks, max_iters=cap, backend=provider.removeprefix("pyinterp-"))


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_resonator(record, progress, request, problem_sets, shape, batch):
    if request.config.getoption("--shapes") == "demo" and (shape, batch) != DEMO_CASE:
        pytest.skip("--shapes=demo")
    row = case_row(shape, batch)
    running = []
    for provider in PROVIDERS:
        why = skip_reason(provider, batch, request.config)
        if why:
            record({**row, "provider": provider, "skipped": why})
        else:
            running.append(provider)
    s, codebooks, accuracy, cap, expected = problem_sets(shape, batch)
    # The slow baselines of the full run (a minute a call) are timed without a warm-up call.
    slow_case = DEVICE.type == "cpu" and batch >= 64 and is_full_run(request.config)
    measured = harness.measure_case({p: solver(p, s, codebooks, cap) for p in running}, DEVICE.type,
                                    label=f"resonator {shape} B={batch}", progress=progress,
                                    warmup=not slow_case, **harness.round_settings(request.config))
    for provider, stats in measured.items():
        answer = stats["result"]
        if provider.startswith("pyinterp-"):
            assert torch.equal(answer.indices, expected.indices), provider
            assert torch.equal(answer.iterations, expected.iterations), provider
        elif provider == "pytorch-loop":
            indices, iterations, converged = answer
            assert torch.equal(indices, expected.indices) and torch.equal(iterations, expected.iterations)
            assert torch.equal(converged, expected.converged)
        # torchhd follows a different trajectory: timed, not compared
        solved = {} if provider == "torchhd-loop" else {"accuracy": accuracy}
        record(harness.measured_row({**row, "provider": provider, **solved}, stats, work=batch,
                                    unit="problems/s"))
