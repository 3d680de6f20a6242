"""The `pyinterp` command (also `python -m pyinterp`). Each subcommand lives in its own module, which
provides HELP, add_arguments(parser) and run(args) -> exit code."""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

# (command, module); a module that cannot be imported (a missing optional dependency) is reported.
COMMANDS = (
    ("info", "pyinterp.info"),
    ("demo", "pyinterp.demo"),
    ("train-sae", "pyinterp.sae.cli"),
    ("cache-activations", "pyinterp.sae.cache"),
    ("eval-sae", "pyinterp.sae.evaluate"),
    ("attribute", "pyinterp.attribution.cli"),
    ("factorize", "pyinterp.vsa.cli"),
    ("bench", "pyinterp.bench"),
)


class CommandError(Exception):
    """A problem the user can fix, reported as `pyinterp COMMAND: error: ...` with exit status 2."""


def report(command: str, exc: BaseException) -> int:
    print(f"pyinterp {command}: error: {exc}", file=sys.stderr)
    return 2


# ---- argparse types: a bad value is an argparse error (exit 2) that names the flag ----
def integer_at_least(low: int, meaning: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


positive_int = integer_at_least(1, ">= 1")
nonnegative_int = integer_at_least(0, ">= 0")


def finite_float(low: float | None = None, *, inclusive: bool = True, high: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = low is not None and (value < low if inclusive else value <= low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            bounds = (f"{'>=' if inclusive else '>'} {low}" if low is not None else "finite")
            bounds += f" and <= {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


# ---- checks run before any work, so a run never dies after its compute on a bad path or device ----
def check_device(text: str | None):
    """torch.device(text), refusing a CUDA device this machine does not have."""
    import torch

    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise CommandError(f"--device {text!r} is not a device (e.g. cpu, cuda, cuda:1): {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {text}: this machine has no CUDA device (or this torch is a CPU build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise CommandError(f"--device {text}: only cpu and cuda devices are supported")
    return device


def check_writable_folder(flag: str, folder: str | Path) -> Path:
    """Create `folder` if needed and prove it takes a file (read-only, a file in the way)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".pyinterp-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CommandError(f"{flag} {folder} is not writable: {exc.strerror or exc}") from None
    return folder


def check_output_file(flag: str, path: str | Path, suffix: str | None = None) -> Path:
    """An output file whose folder exists and is writable (the file is written after the work)."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{flag} {path} is a folder; give a file name")
    if suffix and path.suffix.lower() != suffix:
        raise CommandError(f"{flag} {path}: the file name must end in {suffix}")
    if not path.parent.is_dir():
        raise CommandError(f"{flag} {path}: the folder {path.parent} does not exist")
    check_writable_folder(flag, path.parent)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyinterp",
        description="Fast, exact kernels for interpretability research (top-k SAEs, integrated "
                    "Jacobians, resonator networks).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
