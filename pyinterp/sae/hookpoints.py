"""Hookpoints of a Hugging Face model: where SAE activations are read, and one forward pass that
captures all of them and stops after the last one.

A hookpoint is a module path (`model.layers.3.mlp`), the module's output by default or its input with
the suffix `:input`; globs match several (`model.layers.*.mlp`: `*` stands for one path component,
`**` for any number, `?` for one character). Layers by number follow `train-sae
--layer` (pyinterp/models.py: 0 = the embeddings, i = the output of block i), and ranges such as
`0-11` or `2,4,6` name several."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch
from torch import nn

from pyinterp import models

INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class Hookpoint:
    name: str           # the module path, with ":input" when the module's input is read
    module: nn.Module
    reads_input: bool


def parse_layers(spec: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (in the order given, duplicates dropped)."""
    layers: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first:
                    raise ValueError
                chosen = range(first, last + 1)
            else:
                chosen = [int(part)]
        except ValueError:
            raise ValueError(f"layers: {spec!r} is not a list of layer numbers or ranges such as 0-11,14"
                             ) from None
        layers.extend(layer for layer in chosen if layer not in layers)
    return layers


def _glob(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(wild.get(part, re.escape(part)) for part in parts))


def resolve(model: nn.Module, hookpoints: list[str] | None = None, layers: str | None = None) -> list[Hookpoint]:
    """The hookpoints named by module paths / globs and by layer numbers; an unknown name raises with
    the closest module paths."""
    if not hookpoints and layers is None:
        raise ValueError("hookpoints: name at least one (module paths such as model.layers.*.mlp, or layers)")
    modules = dict(model.named_modules())
    found: list[Hookpoint] = []

    def add(point: Hookpoint) -> None:
        if point.name in {p.name for p in found}:
            return
        found.append(point)

    for pattern in hookpoints or []:
        reads_input = pattern.endswith(INPUT_SUFFIX)
        path = pattern[: -len(INPUT_SUFFIX)] if reads_input else pattern
        glob = _glob(path)
        matches = [name for name in modules if name and glob.fullmatch(name)]
        if not matches:
            close = difflib.get_close_matches(path, [name for name in modules if name], n=5, cutoff=0.5)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(f"hookpoints: {pattern!r} matches no module of {type(model).__name__}{hint}")
        for name in matches:
            add(Hookpoint(name + (INPUT_SUFFIX if reads_input else ""), modules[name], reads_input))
    for layer in parse_layers(layers) if layers is not None else []:
        description, module, reads_input = models.resolve_layer(model, layer)
        name = description.replace(" (input)", INPUT_SUFFIX)
        add(Hookpoint(name, module, reads_input))
    return found


class _StopForward(Exception):
    """Raised once every hookpoint has been read: the rest of the model need not run."""


def _hidden(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def capture(model: nn.Module, points: list[Hookpoint], **inputs) -> dict[str, torch.Tensor]:
    """Run `model(**inputs)` until every hookpoint has fired; {name: tensor (batch, positions, d)}."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(point: Hookpoint):
        def read(_module, args, output=None):
            if point.name in captured:
                raise RuntimeError(f"hookpoints: {point.name} ran twice in one forward pass; hook a "
                                   "module that runs once")
            captured[point.name] = _hidden(args if point.reads_input else output)
            if len(captured) == len(points):
                raise _StopForward
        return read

    handles = [point.module.register_forward_pre_hook(hook_for(point)) if point.reads_input
               else point.module.register_forward_hook(hook_for(point)) for point in points]
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [point.name for point in points if point.name not in captured]
    if missing:
        raise RuntimeError(f"hookpoints: {', '.join(missing)} did not run in the forward pass")
    return {point.name: captured[point.name] for point in points}
