"""Where a Trainer sends its logged metrics besides metrics.jsonl, when the user opts in:
TensorBoard (torch.utils.tensorboard, needs the tensorboard package) or Weights & Biases (needs wandb;
WANDB_MODE=offline works without a network). Each sink takes the same dicts metrics.jsonl gets."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SINKS = ("tensorboard", "wandb")


class MissingPackageError(RuntimeError):
    """The package a sink needs is not installed."""


def _require(package: str, sink: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise MissingPackageError(f"--log-to {sink} needs the {package} package (pip install {package})")


class TensorBoardSink:
    def __init__(self, folder: Path, run: str):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(folder) / "tensorboard" / run))

    def log(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, metrics["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, folder: Path, run: str):
        _require("wandb", "wandb")
        import wandb

        self.run = wandb.init(project="pyinterp", name=run, dir=str(folder), reinit="create_new")

    def log(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def close(self) -> None:
        self.run.finish()


def check_sinks(names) -> None:
    """Before any work: each name is a sink whose package is installed."""
    unknown = [name for name in names or [] if name not in SINKS]
    if unknown:
        raise ValueError(f"--log-to must name {' or '.join(SINKS)}, got {', '.join(unknown)}")
    for name in names or []:
        _require(name, name)


def make_sinks(names, folder: Path, run: str) -> list:
    """The sinks named (each of SINKS at most once); a missing package raises naming it."""
    check_sinks(names)
    classes = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
    return [classes[name](folder, run) for name in dict.fromkeys(names or [])]
