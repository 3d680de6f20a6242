"""Collects every benchmark's row and writes them, with baseline ratios, to benches/results/ at the end."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import add_baseline_ratios, format_table, write_results  # noqa: E402

_ROWS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--shapes", default="small", choices=("small", "paper", "all"),
                     help="small: shapes for this CPU; paper: the sae.md GPU shapes; all: both")
    parser.addoption("--no-record", action="store_true", help="do not append to benches/results/")


@pytest.fixture
def record(request):
    """record(row): keep one measured (or skipped) row for the results file."""
    return _ROWS.append


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    add_baseline_ratios(_ROWS)
    print("\n" + format_table(_ROWS))
    if not session.config.getoption("--no-record"):
        for device in sorted({row["device_kind"] for row in _ROWS}):
            path = write_results([r for r in _ROWS if r["device_kind"] == device], device)
            print(f"results appended to {path}")
