"""`pyinterp bench`: every pyinterp backend side by side with torch eager, torch.compile and the peer
libraries, on this machine, in roofline units; a table, a long-format results file and PNG plots.
It runs the pytest-benchmark suites of the source tree's benches/ folder."""
from __future__ import annotations

import os
from pathlib import Path

HELP = "benchmark every backend against torch and the peer libraries; table, results file, plots"
SOURCE_BENCHES = Path(__file__).resolve().parent.parent / "benches"


def available_ops(bench_dir: Path = SOURCE_BENCHES) -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in bench_dir.glob("bench_*.py"))


def add_arguments(parser) -> None:
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help=f"ops to benchmark (default: all of {', '.join(available_ops()) or 'none found'})")
    parser.add_argument("--shapes", choices=("small", "paper", "all"), default="small",
                        help="small: shapes for a CPU; paper: the specs' GPU shapes; all: both (default small)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=SOURCE_BENCHES / "results",
                        help="folder for the results file <device>.jsonl and plots/ (default benches/results)")
    parser.add_argument("--filter", default=None, help="pytest -k expression to select providers or shapes")
    parser.add_argument("--no-record", action="store_true", help="print the table only; write no files")
    parser.add_argument("--bench-dir", type=Path, default=SOURCE_BENCHES, help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def pytest_arguments(args) -> list[str]:
    bench_dir = args.bench_dir
    if not bench_dir.is_dir():
        raise SystemExit(f"pyinterp bench: no benchmark suites at {bench_dir}; it runs from a source "
                         "checkout of pyinterp (pip install -e .)")
    ops = args.ops or available_ops(bench_dir)
    unknown = sorted(set(ops) - set(available_ops(bench_dir)))
    if unknown:
        raise SystemExit(f"pyinterp bench: unknown op(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(available_ops(bench_dir))}")
    command = [str(bench_dir / f"bench_{op}.py") for op in ops]
    command += ["-q", "-p", "no:cacheprovider", f"--rootdir={bench_dir}", "-c", os.devnull,
                f"--shapes={args.shapes}", f"--results-dir={args.out}", "-W", "ignore::DeprecationWarning",
                "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name"]
    if args.no_record:
        command.append("--no-record")
    else:
        command.append(f"--plots-dir={args.out / 'plots'}")
    if args.filter:
        command += ["-k", args.filter]
    return command


def run(args) -> int:
    import pytest

    if args.device:
        os.environ["PYINTERP_BENCH_DEVICE"] = args.device
    exit_code = pytest.main(pytest_arguments(args))
    return 0 if exit_code in (0, 5) else int(exit_code)  # 5: every case skipped
