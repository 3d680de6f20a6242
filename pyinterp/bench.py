"""`pyinterp bench`: every pyinterp backend side by side with torch eager, torch.compile and the peer
libraries, on this machine, in roofline units; a table, a long-format results file and PNG plots.
It runs the benchmark suites of the source tree's benches/ folder (pytest files); the providers of
each case take turns in interleaved rounds, and a line per provider shows what runs."""
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
    parser.add_argument("--shapes", choices=("demo", "small", "paper", "all"), default="all",
                        help="demo: one small shape per op (seconds a case); small: the CPU shapes without "
                             "the slow cases (minutes); paper: the specs' GPU shapes; all: the full run, "
                             "small and paper shapes with the slow cases (default)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="seconds of interleaved timing rounds per case (default: 1.5 demo, 6 small, "
                             "20 otherwise; at least 3, 5 or 7 rounds beyond the warm-up, fewer only where "
                             "the rounds outlast a ceiling of 4 budgets, 4 s for demo)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=SOURCE_BENCHES / "results",
                        help="folder for the results file <device>.jsonl and plots/ (default benches/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: every core this process may run on)")
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
    # In `pyinterp demo` some plugins' modules (anyio) are imported before pytest starts: pytest only
    # warns that it cannot rewrite their asserts, which the benches do not use.
    command += ["-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", f"--rootdir={bench_dir}", "-c", os.devnull,
                f"--shapes={args.shapes}", f"--results-dir={args.out}", "-W", "ignore::DeprecationWarning"]
    for option in ("budget", "threads"):
        if getattr(args, option) is not None:
            command.append(f"--{option}={getattr(args, option)}")
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
