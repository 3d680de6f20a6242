"""Operational capacity of a resonator network (docs/resonator.md, "Capacity protocol").

Codebooks i.i.d. Rademacher, targets drawn uniformly, success = every factor decoded, an iteration cap
per problem size; the operational capacity is the largest M per factor whose all-factor accuracy is
>= 99% within the cap. Caps:
  kent  ceil(0.001 * M^F): Kent, Frady, Sommer, Olshausen, "Resonator networks 2", Neural Computation
        32 (2020), who report M ~ 79 per factor for F = 3, D = 1500 with OP weights (~99 with OLS).
  ibm   floor(M^(F-1) / F), fewer similarity evaluations (F * M per sweep) than brute force over M^F:
        Langenegger et al., "In-memory factorization of holographic perceptual representations",
        Nature Nanotechnology 18 (2023).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pyinterp import _validation
from pyinterp.ops.resonator import resonator
from pyinterp.vsa.vectors import random_codebooks, random_problems

OP = "capacity"
TARGET_ACCURACY = 0.99


def iteration_cap(cap: str | int, size: int, factors: int) -> int:
    if cap == "kent":
        return max(1, math.ceil(0.001 * size ** factors))
    if cap == "ibm":
        return max(1, size ** (factors - 1) // factors)
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
        return cap
    raise ValueError(f"{OP}: cap must be 'kent', 'ibm' or a positive int, got {cap!r}")


@dataclass
class CapacityPoint:
    size: int                   # M per factor
    cap: int                    # iteration cap used
    trials: int
    factor_accuracy: float      # fraction of factors decoded correctly
    accuracy: float             # fraction of problems with every factor decoded
    mean_iterations: float
    median_iterations: float
    p99_iterations: float
    seconds: float


@dataclass
class CapacityReport:
    dim: int
    factors: int
    points: list[CapacityPoint]

    def operational_capacity(self) -> int | None:
        """The largest tested M whose all-factor accuracy is >= 99%."""
        passing = [p.size for p in self.points if p.accuracy >= TARGET_ACCURACY]
        return max(passing) if passing else None

    def fitted_capacity(self) -> float | None:
        """M where a power law fitted to the failure rate, 1 - accuracy ~ c * M^b, reaches 1%.
        Near 99% the accuracy curve is flat (about 0.04% per unit of M at F = 3, D = 1500), so the
        first tested M below 99% moves by several M with sampling noise; the fit uses every tested M,
        each weighted by its failure count (the inverse variance of log(failure rate))."""
        fits = [(math.log(p.size), math.log(1 - p.accuracy), p.trials * (1 - p.accuracy))
                for p in self.points if 0 < p.accuracy < 1]
        if len({x for x, _, _ in fits}) < 2:
            return None
        total = sum(w for _, _, w in fits)
        mean_x = sum(w * x for x, _, w in fits) / total
        mean_y = sum(w * y for _, y, w in fits) / total
        slope = (sum(w * (x - mean_x) * (y - mean_y) for x, y, w in fits)
                 / sum(w * (x - mean_x) ** 2 for x, _, w in fits))
        if slope <= 0:
            return None
        return math.exp(mean_x + (math.log(1 - TARGET_ACCURACY) - mean_y) / slope)


def capacity(dim: int, factors: int, sizes: Sequence[int], *, trials: int = 1000,
             cap: str | int = "kent", seed: int = 0, batch: int = 1024, backend: str = "auto",
             progress: bool = False, out: Callable[[str], None] | None = print,
             device=None, **resonator_options) -> CapacityReport:
    """Measure accuracy and iterations at each M in sizes (F = factors codebooks of M, dimension D)
    over `trials` random problems, solved `batch` at a time; print one row per M and the operational
    capacity (out=None prints nothing). resonator_options go to pyinterp.vsa.resonator (update,
    weights, activation, noise, ...); max_iters is the cap."""
    _validation.check_int(OP, "dim", dim, low=1)
    _validation.check_int(OP, "factors", factors, low=1)
    _validation.check_int(OP, "trials", trials, low=1)
    _validation.check_int(OP, "batch", batch, low=1)
    if not sizes:
        raise ValueError(f"{OP}: sizes must list at least one codebook size M")
    if "max_iters" in resonator_options:
        raise ValueError(f"{OP}: the iteration cap comes from cap=, not max_iters")
    caps = [iteration_cap(cap, size, factors) for size in sizes]
    say = out or (lambda line: None)
    options = " ".join(f"{k}={v}" for k, v in sorted(resonator_options.items()))
    say(f"capacity: D={dim} F={factors} trials={trials} cap={cap} backend={backend} {options}".rstrip())
    say(f"{'M':>6} {'search space':>12} {'cap':>8} {'per-factor':>10} {'all-factor':>10} "
        f"{'iters mean':>10} {'median':>7} {'p99':>7} {'seconds':>8}")
    progress_bar = None
    if progress:
        from tqdm import tqdm

        progress_bar = tqdm(total=trials * len(sizes), unit="problem", leave=False)
    points = []
    for index, (size, max_iters) in enumerate(zip(sizes, caps)):
        _validation.check_int(OP, f"sizes[{index}]", size, low=1)
        codebooks = random_codebooks([size] * factors, dim, seed=seed + index, device=device)
        correct_factors = correct_problems = 0
        iterations = []
        start = time.perf_counter()
        for first in range(0, trials, batch):
            count = min(batch, trials - first)
            s, targets = random_problems(codebooks, count, seed=(seed + index) * 1_000_003 + first)
            result = resonator(s, codebooks, max_iters=max_iters, backend=backend, **resonator_options)
            hits = result.indices == targets
            correct_factors += int(hits.sum())
            correct_problems += int(hits.all(1).sum())
            iterations.append(result.iterations.cpu())
            if progress_bar is not None:
                progress_bar.update(count)
        seconds = time.perf_counter() - start
        sweeps = torch.cat(iterations).double()
        point = CapacityPoint(size, max_iters, trials, correct_factors / (trials * factors),
                              correct_problems / trials, float(sweeps.mean()), float(sweeps.median()),
                              float(torch.quantile(sweeps, 0.99)), seconds)
        points.append(point)
        say(f"{size:>6} {size ** factors:>12.3g} {max_iters:>8} {point.factor_accuracy:>10.4f} "
            f"{point.accuracy:>10.4f} {point.mean_iterations:>10.1f} {point.median_iterations:>7.0f} "
            f"{point.p99_iterations:>7.0f} {seconds:>8.2f}")
    if progress_bar is not None:
        progress_bar.close()
    report = CapacityReport(dim, factors, points)
    best, fitted = report.operational_capacity(), report.fitted_capacity()
    fitted_text = (f"; power-law fit of the failure rate crosses {1 - TARGET_ACCURACY:.0%} at M ~ {fitted:.1f}"
                   if fitted is not None else "")
    if best is None:
        say(f"operational capacity: no tested M reaches {TARGET_ACCURACY:.0%} accuracy{fitted_text}")
    else:
        say(f"operational capacity: M = {best} (search space {best ** factors:.3g}){fitted_text}")
    return report
