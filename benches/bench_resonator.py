"""Resonator-network search: problems solved per second (B problems to their stop / wall time).

Shapes from resonator.md / issue 5: F=3, D=1500, M=100 and F=4, D=2000, M=40, B in {1, 64, 1024}, the
baseline rule (sequential, OP, identity, fixed-point stop, cap 0.001 M^F). Providers:
  pyinterp-<backend>  each pyinterp backend that runs here (triton only on a GPU: the CPU interpreter
                      is a correctness tool; torch = the float64 reference, B <= 64 only)
  pytorch-loop        the strongest plain-PyTorch approach, written below: two GEMMs per factor per
                      sweep over the still-active problems (fp32, exact here), boolean indexing drops
                      the converged ones every sweep
  torchhd-loop        torchhd.resonator (one parallel MAP step) in a Python loop, if torch-hd is
                      installed (peers extra)
Every provider but torchhd (a different trajectory) must give pyinterp's answer, so all do the same
work. Rows go to the shared results file (benches/results/<device>.jsonl), throughput in problems/s.
Run: pyinterp bench --ops resonator, or pytest benches/bench_resonator.py [-k "F3 and B1024"]
"""
import importlib.util

import pytest
import torch

import harness
from pyinterp import _dispatch
from pyinterp.ops.resonator import resonator
from pyinterp.vsa import iteration_cap, random_codebooks, random_problems

SHAPES = {"F3-D1500-M100": (3, 1500, 100), "F4-D2000-M40": (4, 2000, 40)}
BATCHES = (1, 64, 1024)
PYINTERP = ("cuda", "triton", "cpu", "torch")
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


def measure(benchmark, record, row: dict, solve, *, rounds: int):
    """The answer and peak memory from a first call of solve(); the time is the median of `rounds`
    more calls (pyinterp) or that first call itself (rounds=0: the slow baselines). Records the row."""
    answer, seconds, peak = harness.timed_peak(solve, DEVICE.type)
    if rounds:
        benchmark.pedantic(solve, rounds=rounds, iterations=1)
        seconds = benchmark.stats.stats.median
    record({**row, "median_ms": round(seconds * 1e3, 3), "peak_mib": round(peak / 2**20, 1),
            "throughput": round(row["N"] / seconds, 2), "unit": "problems/s"})
    return answer


def case_row(shape: str, batch: int, provider: str) -> dict:
    factors, dim, size = SHAPES[shape]
    return {"op": "resonator", "shape": shape, "N": batch, "F": factors, "D": dim, "M": size,
            "dtype": "bipolar", "direction": f"solve B={batch}", "provider": provider,
            "device_kind": DEVICE.type}


def skip(record, row: dict, reason: str):
    record({**row, "skipped": reason})
    pytest.skip(reason)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", PYINTERP)
def test_pyinterp(benchmark, record, problem_sets, shape, batch, backend):
    row = case_row(shape, batch, f"pyinterp-{backend}")
    why = _dispatch.unavailable_reason(backend, DEVICE)
    if backend == "triton" and DEVICE.type == "cpu":
        why = "triton on CPU runs only under the interpreter (a correctness tool, not timed)"
    if backend == "torch" and batch > 64:
        why = "the float64 reference is timed at B <= 64 only"
    if why:
        skip(record, row, why)
    s, codebooks, accuracy, cap, expected = problem_sets(shape, batch)
    result = measure(benchmark, record, {**row, "accuracy": accuracy}, lambda: resonator(s, codebooks, max_iters=cap, backend=backend),
                     rounds=1 if backend == "torch" else 3)
    assert torch.equal(result.indices, expected.indices) and torch.equal(result.iterations, expected.iterations)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_pytorch_loop(benchmark, record, problem_sets, shape, batch):
    s, codebooks, accuracy, cap, expected = problem_sets(shape, batch)
    row = {**case_row(shape, batch, "pytorch-loop"), "accuracy": accuracy}
    indices, iterations, converged = measure(benchmark, record, row, lambda: pytorch_loop(s, codebooks, cap),
                                             rounds=0)
    assert torch.equal(indices, expected.indices) and torch.equal(iterations, expected.iterations)
    assert torch.equal(converged, expected.converged)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torchhd_loop(benchmark, record, problem_sets, shape, batch):
    row = case_row(shape, batch, "torchhd-loop")
    if importlib.util.find_spec("torchhd") is None:
        skip(record, row, "torch-hd is not installed (optional extra: pip install '.[peers]')")
    if DEVICE.type == "cpu" and batch > 64:
        # Measured here: B=64 at F=3 took 78 s (its loop runs to the cap: the parallel rule with
        # sgn(0) = 0 rarely reaches a fixed point for the whole batch).
        skip(record, row, "timed at B <= 64 on a CPU (B=1024 would take 20-40 min here)")
    s, codebooks, _, cap, _ = problem_sets(shape, batch)
    measure(benchmark, record, row, lambda: torchhd_loop(s, codebooks, cap), rounds=0)
