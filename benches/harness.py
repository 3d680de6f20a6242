"""Shared benchmark machinery: timing done right, peak memory, roofline units, and one long-format
results file per device kind (benches/results/<device>.jsonl), appended per run."""
from __future__ import annotations

import ctypes
import datetime
import json
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

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


def _rss_bytes(key: str) -> int:
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
        before = _rss_bytes("VmRSS")
    start = time.perf_counter()
    try:
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        if device != "cuda":
            _set_mmap_threshold(_STEADY_MMAP_THRESHOLD)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM")
    return result, seconds, max(peak - before, 0)


def peak_memory_bytes(fn, device: str) -> int:
    """Extra memory at the high-water mark of one call (see timed_peak)."""
    return timed_peak(fn, device)[2]


def median_ms(fn, device: str, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms; CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


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
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")}


def measure_roofline(device: str, dtype: torch.dtype) -> dict:
    """This machine's attainable peaks, measured rather than taken from a datasheet: a large matmul in
    the benchmark dtype (TFLOP/s) and a large device copy (GB/s, bytes read + written)."""
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul_ms = median_ms(lambda: torch.mm(a, b), device, repeats=5, warmup=2)
    source = torch.randn((2 if device == "cuda" else 1) * 2**28 // 4, device=device)
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), device, repeats=5, warmup=2)
    return {"matmul_tflops": round(2 * size**3 / (matmul_ms * 1e-3) / 1e12, 3),
            "copy_gbps": round(2 * source.numel() * 4 / (copy_ms * 1e-3) / 1e9, 1)}


UNIT_SCALE = {"TFLOP/s": 1e12, "GB/s": 1e9, "tok/s": 1.0, "problems/s": 1.0}
# The units with a measured roofline; the others (whole training steps, solved problems) have none.
ROOFLINE_KEYS = {"TFLOP/s": "matmul_tflops", "GB/s": "copy_gbps"}


def roofline_fraction(throughput: float, unit: str, roofline: dict) -> float:
    """Throughput as a fraction of the measured peak of its unit."""
    return throughput / roofline[ROOFLINE_KEYS[unit]]


def add_baseline_ratios(rows: list[dict]) -> None:
    """speedup_vs_best_baseline: the best non-pyinterp provider's time over this row's time,
    within one (op, shape, dtype, direction) measured in the same run."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["direction"]), []).append(row)
    for group in groups.values():
        baselines = [r["median_ms"] for r in group
                     if not r["provider"].startswith("pyinterp") and r.get("median_ms")]
        for row in group:
            row["speedup_vs_best_baseline"] = (round(min(baselines) / row["median_ms"], 3)
                                               if baselines and row.get("median_ms") else None)


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
    header = (f"{'op':14s} {'shape':17s} {'dtype':9s} {'direction':16s} {'provider':19s} "
              f"{'median ms':>10s} {'peak MiB':>9s} {'throughput':>16s} {'% roof':>7s} {'vs best base':>12s}")
    lines = [header]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['op']:14s} {r['shape']:17s} {r['dtype']:9s} {r['direction']:16s} "
                         f"{r['provider']:19s} skipped: {r['skipped']}")
            continue
        ratio = r.get("speedup_vs_best_baseline")
        fraction = r.get("roofline_fraction")
        roof_text = "-" if fraction is None else f"{100 * fraction:.1f}%"
        lines.append(f"{r['op']:14s} {r['shape']:17s} {r['dtype']:9s} {r['direction']:16s} {r['provider']:19s} "
                     f"{r['median_ms']:10.2f} {r['peak_mib']:9.1f} {r['throughput']:9.2f} {r['unit']:>6s} "
                     f"{roof_text:>7s} {(f'{ratio:.2f}x' if ratio else '-'):>12s}")
    return "\n".join(lines)
