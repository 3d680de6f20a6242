"""The resonator section of `pyinterp demo`: a batch of factorisations, a few seconds on a CPU."""
from __future__ import annotations

import time


from pyinterp import _dispatch
from pyinterp.ops.resonator import resonator
from pyinterp.vsa.vectors import random_codebooks, random_problems


def demo(dim: int = 1500, factors: int = 3, size: int = 60, batch: int = 512, seed: int = 0) -> None:
    """Factor `batch` random composites of F = factors codevectors out of codebooks of `size` each and
    print accuracy, iterations and speed, with a few decoded rows."""
    codebooks = random_codebooks([size] * factors, dim, seed=seed)
    s, targets = random_problems(codebooks, batch, seed=seed + 1)
    backend = _dispatch.op_spec("resonator").resolve("auto", s.device)
    if backend == "torch":  # no compiled kernels: keep the float64 reference to a few seconds
        s, targets = s[:32], targets[:32]
        batch = 32
    cap = max(1, round(0.001 * size ** factors))
    start = time.perf_counter()
    result = resonator(s, codebooks, max_iters=cap)
    seconds = time.perf_counter() - start
    solved = (result.indices == targets).all(1)
    print(f"== resonator networks: {batch} factorisations, F={factors}, D={dim}, M={size} per factor "
          f"(search space {size ** factors:.2g}), backend={backend} ==")
    print(f"all factors correct: {solved.float().mean():.1%}   converged: "
          f"{result.converged.float().mean():.1%}   sweeps: mean {result.iterations.float().mean():.1f}, "
          f"max {int(result.iterations.max())} (cap {cap})")
    print(f"{seconds:.2f} s, {batch / seconds:,.0f} problems/s")
    print("read |similarity| (1.0 = the codevector exactly): a bipolar factorisation is defined only up to\n"
          "sign flips whose product is +1 (negating two factors leaves their product unchanged), so a\n"
          "correctly decoded factor may come out negated, with similarity -1.0")
    for row in range(3):
        similarities = result.similarities[row]
        verdict = "correct up to sign" if bool(solved[row]) else "wrong"
        signs = "".join("+" if v >= 0 else "-" for v in similarities.tolist())
        product = "+" if signs.count("-") % 2 == 0 else "-"
        print(f"  problem {row}: target {targets[row].tolist()} -> decoded {result.indices[row].tolist()} "
              f"({verdict}) after {int(result.iterations[row])} sweeps, |similarity| "
              f"{[round(v, 2) for v in similarities.abs().tolist()]}, signs {signs} (product {product})")
