"""The `pyinterp` command (also `python -m pyinterp`). Each subcommand lives in its own module, which
provides HELP, add_arguments(parser) and run(args) -> exit code."""
from __future__ import annotations

import argparse
import importlib
import sys

# (command, module); a module that cannot be imported (a missing optional dependency) is reported.
COMMANDS = (
    ("info", "pyinterp.info"),
    ("demo", "pyinterp.demo"),
    ("train-sae", "pyinterp.sae.cli"),
    ("cache-activations", "pyinterp.sae.cache"),
    ("attribute", "pyinterp.attribution.cli"),
    ("factorize", "pyinterp.vsa.cli"),
    ("bench", "pyinterp.bench"),
)


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
