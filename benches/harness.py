"""Shared benchmark machinery: timing done right, peak memory, roofline units, and one long-format
results file per device kind (benches/results/<device>.jsonl), appended per run."""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The 1-minute load average when the run began (this module is imported at its start): the results
# say how busy the machine was, beside the load when they were written.
LOAD_AT_START = round(os.getloadavg()[0], 2)

_M_MMAP_THRESHOLD = -3
# glibc's dynamic mmap threshold settles at its 32 MiB maximum once large blocks have been freed.
_STEADY_MMAP_THRESHOLD = 32 << 20


def _set_mmap_threshold(nbytes: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)
    except OSError:  # not glibc: CPU peak memory may read low
        pass


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def device_slug(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu-" + platform.machine()


def rss_bytes(key: str) -> int:
    """VmRSS (resident now) or VmHWM (high-water mark since the last reset) of this process, in bytes."""
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024


def timed_peak(fn, device: str):
    """(result, seconds, extra peak bytes) of one call fn(). Peak memory is the extra memory at the
    high-water mark: CUDA allocator peak on GPU; on CPU the resident-set high-water mark (reset through
    /proc/self/clear_refs) above the resident set before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        # While measuring, blocks of 1 MiB and more are mmap'd, so that memory freed by an earlier call
        # is not silently reused from the heap, unseen by the high-water mark; timing runs never see this.
        _set_mmap_threshold(1 << 20)
        Path("/proc/self/clear_refs").write_text("5")
        before = rss_bytes("VmRSS")
    start = time.perf_counter()
    try:
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        if device != "cuda":
            _set_mmap_threshold(_STEADY_MMAP_THRESHOLD)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")
    return result, seconds, max(peak - before, 0)


def peak_memory_bytes(fn, device: str) -> int:
    """Extra memory at the high-water mark of one call (see timed_peak)."""
    return timed_peak(fn, device)[2]


def time_once_ms(fn, device: str) -> float:
    """Wall time of one call fn() in ms; CUDA events on GPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def median_ms(fn, device: str, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms; CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once_ms(fn, device) for _ in range(repeats))


# ---------------------------------------------------------------- interleaved rounds and their statistics
def print_progress(line: str) -> None:
    """One line of what a running benchmark is doing, shown at once (under pytest, the `progress`
    fixture of benches/conftest.py writes past the output capture instead)."""
    print(line, flush=True)


SLOW_REASON = "a minute or more here: runs in the full `pyinterp bench` (--shapes all) only"
# --shapes -> seconds of interleaved rounds per case and the fewest rounds (beyond the warm-up)
ROUND_SETTINGS = {"demo": {"budget_s": 1.5, "min_rounds": 3, "ceiling_s": 4.0},
                  "small": {"budget_s": 6.0, "min_rounds": 5}}
FULL_RUN_ROUNDS = {"budget_s": 20.0, "min_rounds": 7}


def is_full_run(config) -> bool:
    """Whether this run includes the slow cases: not with --shapes demo or small."""
    return config.getoption("--shapes") not in ROUND_SETTINGS


def round_settings(config) -> dict:
    settings = dict(ROUND_SETTINGS.get(config.getoption("--shapes"), FULL_RUN_ROUNDS))
    if config.getoption("--budget") is not None:
        settings["budget_s"] = config.getoption("--budget")
    return settings


def interleaved_rounds(steps: dict, timer, *, budget_s: float, min_rounds: int, max_rounds: int,
                       ceiling_s: float, clock=time.perf_counter) -> dict[str, list[float]]:
    """Per-round times timer(step) of every provider's step, the providers taking turns within each
    round and the order rotated every round (A B C, B C A, C A B, ...): on a shared machine the speed
    drifts with the load, and providers timed back to back would each see a different machine.
    Rounds go on until budget_s has passed and min_rounds are done (more rounds where a round is
    short), at most max_rounds; past ceiling_s no new round starts, so a very slow case stops after
    its first round."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = clock()
    for done in range(max_rounds if names else 0):
        elapsed = clock() - start
        if done and (elapsed >= ceiling_s or (done >= min_rounds and elapsed >= budget_s)):
            break
        shift = done % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timer(steps[name]))
    return times


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default rule)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_statistics(round_ms: list[float]) -> dict:
    """min / median / p80 of one provider's per-round times."""
    return {"rounds": len(round_ms), "min_ms": round(min(round_ms), 3),
            "median_ms": round(statistics.median(round_ms), 3), "p80_ms": round(quantile(round_ms, 0.8), 3)}


def pair_ratio_statistics(baseline_ms: list[float], ours_ms: list[float]) -> dict:
    """Speed-up baseline / ours of each round pair (the two timed in the same round), and its spread:
    median, interquartile range and extremes over the pairs."""
    if len(baseline_ms) != len(ours_ms):
        raise ValueError(f"round pairs need as many baseline rounds ({len(baseline_ms)}) as ours ({len(ours_ms)})")
    ratios = [b / o for b, o in zip(baseline_ms, ours_ms)]
    return {"pairs": len(ratios), "median": round(statistics.median(ratios), 3),
            "p25": round(quantile(ratios, 0.25), 3), "p75": round(quantile(ratios, 0.75), 3),
            "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def is_pyinterp(provider: str) -> bool:
    return provider.startswith("pyinterp")


def ratios_against_baselines(round_ms: dict[str, list[float]]) -> dict[str, dict]:
    """For each pyinterp provider: its pair-ratio statistics against every other provider of the case."""
    return {ours: {base: pair_ratio_statistics(round_ms[base], round_ms[ours])
                   for base in round_ms if not is_pyinterp(base)}
            for ours in round_ms if is_pyinterp(ours)}


def format_ratio(stats: dict) -> str:
    return (f"{stats['median']:.2f}x (IQR {stats['p25']:.2f}-{stats['p75']:.2f}, range {stats['min']:.2f}-"
            f"{stats['max']:.2f}, {stats['pairs']} pairs)")


# A timed sample of a short step repeats it up to this long: one call of a millisecond is at the
# mercy of a single preemption on a shared machine.
MIN_SAMPLE_MS = 20.0
MAX_CALLS_PER_SAMPLE = 100


def calls_per_sample(call_ms: float) -> int:
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_MS / max(call_ms, 1e-6))))


def repeated(step, calls: int):
    def run():
        for _ in range(calls):
            step()
    return run


def measure_case(steps: dict, device: str, *, budget_s: float, min_rounds: int = 5, max_rounds: int = 200,
                 ceiling_s: float | None = None, warmup: bool = True, label: str = "",
                 progress=print_progress) -> dict[str, dict]:
    """Times the providers' steps (already set up; a torch.compile provider already compiled) in
    interleaved rounds, after one warm-up call each (unless warmup=False: a slow baseline with nothing
    to warm), then measures each one's peak memory in one more call. A round's sample of a step
    shorter than MIN_SAMPLE_MS (judged by its warm-up) repeats it, and counts the mean call. Returns,
    per provider, its statistics, per-round times, peak bytes, the result of that last call, and
    (pyinterp providers) the pair ratios against each baseline; prints a line per provider as it goes."""
    calls = dict.fromkeys(steps, 1)
    if warmup:
        for name, step in steps.items():
            _, seconds, _ = timed_peak(step, device)
            calls[name] = calls_per_sample(seconds * 1e3)
            progress(f"{label} {name}: warm-up {seconds:.2f} s" + (f", {calls[name]} calls a sample"
                                                                  if calls[name] > 1 else ""))
    samples = {name: repeated(step, calls[name]) for name, step in steps.items()}
    ceiling_s = 4 * budget_s if ceiling_s is None else ceiling_s
    sample_ms = interleaved_rounds(samples, lambda sample: time_once_ms(sample, device), budget_s=budget_s,
                                   min_rounds=min_rounds, max_rounds=max_rounds, ceiling_s=ceiling_s)
    round_ms = {name: [t / calls[name] for t in times] for name, times in sample_ms.items()}
    ratios = ratios_against_baselines(round_ms)
    measured = {}
    for name, step in steps.items():
        result, _, peak = timed_peak(step, device)
        stats = time_statistics(round_ms[name])
        measured[name] = {**stats, "calls_per_round": calls[name], "round_ms": [round(t, 3) for t in round_ms[name]],
                          "peak_bytes": peak, "result": result, "vs_baselines": ratios.get(name, {})}
        versus = "; ".join(f"vs {base} {format_ratio(r)}" for base, r in ratios.get(name, {}).items())
        progress(f"{label} {name}: min {stats['min_ms']:.2f} / median {stats['median_ms']:.2f} / "
                 f"p80 {stats['p80_ms']:.2f} ms over {stats['rounds']} rounds" + (f"; {versus}" if versus else ""))
    return measured


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_metadata(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": device_name(device), "device_kind": device, "torch": torch.__version__,
            "triton": triton_version, "git_sha": _git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "cpu_cores": len(os.sched_getaffinity(0)),
            "load_average": {"start": LOAD_AT_START, "end": round(os.getloadavg()[0], 2)}}


def load_warning(threads: int) -> str:
    """A warning when other processes keep this machine's cores busy and the run uses several threads:
    OpenMP threads then mostly wait on each other at their barriers (measured here, load 8 on 2 cores:
    the PyTorch resonator loop 2.0 s on one thread, 29 s on two)."""
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    if threads < 2 or load < cores:
        return ""
    return (f"warning: load average {load:.1f} on {cores} cores: {threads}-thread timings will mostly measure "
            "threads waiting for each other; --threads 1 compares the providers on a loaded machine")


def measure_roofline(device: str, dtype: torch.dtype) -> dict:
    """This machine's attainable peaks, measured rather than taken from a datasheet: a large matmul in
    the benchmark dtype (TFLOP/s) and a large device copy (GB/s, bytes read + written)."""
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul_ms = median_ms(lambda: torch.mm(a, b), device, repeats=3, warmup=1)
    source = torch.randn((2 if device == "cuda" else 1) * 2**28 // 4, device=device)
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), device, repeats=3, warmup=1)
    return {"matmul_tflops": round(2 * size**3 / (matmul_ms * 1e-3) / 1e12, 3),
            "copy_gbps": round(2 * source.numel() * 4 / (copy_ms * 1e-3) / 1e9, 1)}


def measured_row(row: dict, measured: dict, *, work: float, unit: str) -> dict:
    """The results row of one provider's measure_case entry: the time statistics and per-round times,
    peak memory, the pair ratios, and throughput = work / median time in `unit`."""
    throughput = work / (measured["median_ms"] * 1e-3) / UNIT_SCALE[unit]
    row = {**row, **{key: measured[key] for key in ("rounds", "calls_per_round", "min_ms", "median_ms", "p80_ms",
                                                    "round_ms")},
           "peak_mib": round(measured["peak_bytes"] / 2**20, 1), "throughput": round(throughput, 4), "unit": unit}
    if measured["vs_baselines"]:
        row["vs_baselines"] = measured["vs_baselines"]
    return row


UNIT_SCALE = {"TFLOP/s": 1e12, "GB/s": 1e9, "tok/s": 1.0, "problems/s": 1.0}
# The units with a measured roofline; the others (whole training steps, solved problems) have none.
ROOFLINE_KEYS = {"TFLOP/s": "matmul_tflops", "GB/s": "copy_gbps"}


def roofline_fraction(throughput: float, unit: str, roofline: dict) -> float:
    """Throughput as a fraction of the measured peak of its unit."""
    return throughput / roofline[ROOFLINE_KEYS[unit]]


def add_baseline_ratios(rows: list[dict]) -> None:
    """speedup_vs_best_baseline: this row's speed-up over the best (lowest median) non-pyinterp provider
    of the same (op, shape, dtype, direction) in the same run, named by best_baseline. Where the two ran
    in interleaved rounds it is the median of the per-round ratios, with that pair's statistics in
    speedup_spread (a shared machine's drift moves both times of a round alike, not their ratio);
    otherwise the ratio of the two medians."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["direction"]), []).append(row)
    for group in groups.values():
        baselines = [r for r in group if not is_pyinterp(r["provider"]) and r.get("median_ms")]
        best = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
        for row in group:
            if best is None or not row.get("median_ms"):
                row["speedup_vs_best_baseline"] = None
                continue
            row["best_baseline"] = best["provider"]
            spread = row.get("vs_baselines", {}).get(best["provider"])
            if spread:
                row["speedup_spread"] = spread
                row["speedup_vs_best_baseline"] = spread["median"]
            else:
                row["speedup_vs_best_baseline"] = round(best["median_ms"] / row["median_ms"], 3)


def write_results(rows: list[dict], device: str, results_dir: Path = RESULTS_DIR, prefix: str = "") -> Path:
    """Append rows, each with the run's metadata, to results_dir/<prefix><device slug>.jsonl."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{prefix}{device_slug(device)}.jsonl"
    meta = run_metadata(device)
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps({**meta, **row}) + "\n")
    return path


def format_table(rows: list[dict]) -> str:
    header = (f"{'op':14s} {'shape':17s} {'dtype':9s} {'direction':16s} {'provider':19s} {'min ms':>9s} "
              f"{'median ms':>10s} {'p80 ms':>9s} {'rounds':>6s} {'peak MiB':>9s} {'throughput':>16s} "
              f"{'% roof':>7s}  vs best baseline (per-round ratios: IQR, min-max)")
    lines = [header]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['op']:14s} {r['shape']:17s} {r['dtype']:9s} {r['direction']:16s} "
                         f"{r['provider']:19s} skipped: {r['skipped']}")
            continue
        ratio = r.get("speedup_vs_best_baseline")
        spread = r.get("speedup_spread")
        versus = "-" if not ratio else f"{ratio:.2f}x"
        if spread:
            versus += (f" vs {r['best_baseline']} (IQR {spread['p25']:.2f}-{spread['p75']:.2f}, "
                       f"range {spread['min']:.2f}-{spread['max']:.2f}, {spread['pairs']} pairs)")
        fraction = r.get("roofline_fraction")
        roof_text = "-" if fraction is None else f"{100 * fraction:.1f}%"
        lines.append(f"{r['op']:14s} {r['shape']:17s} {r['dtype']:9s} {r['direction']:16s} {r['provider']:19s} "
                     f"{r.get('min_ms', float('nan')):9.2f} {r['median_ms']:10.2f} {r.get('p80_ms', float('nan')):9.2f} "
                     f"{r.get('rounds', 0):6d} {r['peak_mib']:9.1f} {r['throughput']:9.2f} {r['unit']:>6s} "
                     f"{roof_text:>7s}  {versus}")
    return "\n".join(lines)
