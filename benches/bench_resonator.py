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
Every provider's answer is checked against pyinterp's before it is timed, so all do the same work.
Run: pytest benches/bench_resonator.py --benchmark-only [-k "F3 and B1024"]
"""
import pytest
import torch

from pyinterp import _backend
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
            cache[shape, batch] = (s, codebooks, targets, cap, expected)
        return cache[shape, batch]

    return get


def _record(benchmark, s, targets, result, provider):
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        provider=provider, device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), problems=s.shape[0],
        problems_per_second=s.shape[0] / seconds,
        accuracy=float((result.indices == targets).all(1).float().mean()) if hasattr(result, "indices") else None,
        torch=torch.__version__)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", PYINTERP)
def test_pyinterp(benchmark, problem_sets, shape, batch, backend):
    why = _backend.unavailable_reason(backend, DEVICE)
    if backend == "triton" and DEVICE.type == "cpu":
        why = "triton on CPU runs only under the interpreter (a correctness tool, not timed)"
    if backend == "torch" and batch > 64:
        why = "the float64 reference is timed at B <= 64 only"
    if why:
        pytest.skip(why)
    s, codebooks, targets, cap, expected = problem_sets(shape, batch)
    result = resonator(s, codebooks, max_iters=cap, backend=backend)
    assert torch.equal(result.indices, expected.indices) and torch.equal(result.iterations, expected.iterations)
    rounds = 1 if backend == "torch" else 3
    benchmark.pedantic(resonator, args=(s, codebooks), kwargs=dict(max_iters=cap, backend=backend),
                       rounds=rounds, iterations=1)
    _record(benchmark, s, targets, result, f"pyinterp-{backend}")


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_pytorch_loop(benchmark, problem_sets, shape, batch):
    s, codebooks, targets, cap, expected = problem_sets(shape, batch)
    indices, iterations, converged = pytorch_loop(s, codebooks, cap)
    assert torch.equal(indices, expected.indices) and torch.equal(iterations, expected.iterations)
    assert torch.equal(converged, expected.converged)
    benchmark.pedantic(pytorch_loop, args=(s, codebooks, cap), rounds=1, iterations=1)
    _record(benchmark, s, targets, expected, "pytorch-loop")


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torchhd_loop(benchmark, problem_sets, shape, batch):
    pytest.importorskip("torchhd", reason="torch-hd is not installed (pip install torch-hd, peers extra)")
    s, codebooks, targets, cap, expected = problem_sets(shape, batch)
    benchmark.pedantic(torchhd_loop, args=(s, codebooks, cap), rounds=1, iterations=1)
    _record(benchmark, s, targets, expected, "torchhd-loop")

