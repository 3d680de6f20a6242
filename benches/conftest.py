"""Collects every benchmark's row; at the end adds the measured roofline and the baseline ratios,
prints the table, appends the rows to the results file, and draws the plots. Progress lines go to
the terminal while the cases run."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import (LOAD_AT_START, RESULTS_DIR, ROOFLINE_KEYS, SLOW_REASON, add_baseline_ratios, device_slug,  # noqa: E402
                     format_table, is_full_run, load_warning, measure_roofline, roofline_fraction,
                     write_results)

_ROWS: list[dict] = []
_SUMMARY: list[str] = []


def pytest_addoption(parser):
    parser.addoption("--shapes", default="all", choices=("demo", "small", "paper", "all"),
                     help="demo: one small shape per op, for `pyinterp demo`; small: shapes for a CPU, "
                          "without the slow cases; paper: the specs' GPU shapes; all: small and paper "
                          "shapes with the slow cases (default)")
    parser.addoption("--threads", type=int, default=None,
                     help="CPU threads (default: every core this process may run on)")
    parser.addoption("--budget", type=float, default=None,
                     help="seconds of interleaved rounds per case (default: 1.5 demo, 6 small, 20 otherwise)")
    parser.addoption("--results-dir", default=str(RESULTS_DIR), help="where <device>.jsonl is appended")
    parser.addoption("--plots-dir", default=None, help="write PNG plots of this run here")
    parser.addoption("--no-record", action="store_true", help="do not append to the results file")


def pytest_configure(config):
    # CPU timings use every core this process may run on, and only those, unless told otherwise: on
    # a loaded machine two OpenMP threads wait on each other (measured: the resonator's PyTorch loop
    # at B=64, 2.0 s on one thread, 29 s on two).
    torch.set_num_threads(config.getoption("--threads") or len(os.sched_getaffinity(0)))
    config.addinivalue_line("markers", "slow: a minute or more; runs in the full run only (not --shapes "
                                       "demo or small)")


def pytest_sessionstart(session):
    warning = load_warning(torch.get_num_threads())
    if warning:
        session.config.pluginmanager.getplugin("terminalreporter").write_line(warning)


def pytest_collection_modifyitems(config, items):
    if is_full_run(config):
        return
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.skip(reason=SLOW_REASON))


@pytest.fixture
def progress(request):
    """progress(line): show a line at once, past pytest's output capture, on a line of its own."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    terminal = request.config.pluginmanager.getplugin("terminalreporter")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            terminal.write_line(line, flush=True)
    return write


@pytest.fixture
def record():
    """record(row): keep one measured (or skipped) row for the results file."""
    return _ROWS.append


_SESSION_ROOFLINES: dict[tuple[str, str], dict] = {}


def _roofline(device: str, dtype_name: str, results_dir: Path, keep: bool) -> dict:
    """A GPU's peaks are measured once per dtype and reused from results_dir/roofline-<device>.json.
    A CPU's are measured again in every run: on a shared machine the attainable peak moves with the
    load (here 127 GFLOP/s fp32 on a busy day, twice that on a quiet one), and a stale figure would
    put quiet-day runs far above 100%. The file keeps the latest measurement of a recording run (keep);
    a --no-record run leaves it as it is."""
    path = results_dir / f"roofline-{device_slug(device)}.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    if dtype_name in stored and device == "cuda":
        return stored[dtype_name]
    if (device, dtype_name) not in _SESSION_ROOFLINES:
        _SESSION_ROOFLINES[device, dtype_name] = measure_roofline(device, getattr(torch, dtype_name))
        if keep:
            stored[dtype_name] = _SESSION_ROOFLINES[device, dtype_name]
            results_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stored, indent=1) + "\n")
    return _SESSION_ROOFLINES[device, dtype_name]


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    results_dir = Path(session.config.getoption("--results-dir"))
    for row in _ROWS:
        if not row.get("skipped") and row["unit"] in ROOFLINE_KEYS:
            roofline = _roofline(row["device_kind"], row["dtype"], results_dir,
                                 keep=not session.config.getoption("--no-record"))
            row["roofline_fraction"] = round(roofline_fraction(row["throughput"], row["unit"], roofline), 4)
    add_baseline_ratios(_ROWS)
    _SUMMARY.append(format_table(_ROWS))
    _SUMMARY.append(f"load average {LOAD_AT_START} at the start, {os.getloadavg()[0]:.2f} at the end, on "
                    f"{len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} threads")
    if not session.config.getoption("--no-record"):
        for device in sorted({row["device_kind"] for row in _ROWS}):
            path = write_results([r for r in _ROWS if r["device_kind"] == device], device, results_dir)
            _SUMMARY.append(f"results appended to {path}")
    plots_dir = session.config.getoption("--plots-dir")
    if plots_dir:
        from plots import plot_results

        for path in plot_results(_ROWS, Path(plots_dir)):
            _SUMMARY.append(f"plot written to {path}")


def pytest_terminal_summary(terminalreporter):
    for block in _SUMMARY:
        terminalreporter.write_line(block)
