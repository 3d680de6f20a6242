"""Training checkpoints: one tensors file (`checkpoint-STEP-TAG.safetensors`: parameters, Adam state,
dead counters) and one manifest (`checkpoint.json`: the training state, the tensors file's name and
its SHA-256). The manifest is the commit point: it is replaced (atomically, pyinterp/_atomic.py)
only after the new tensors file is on disk, and the tensors file it named before is deleted only
after that. A kill at any point therefore leaves a manifest that describes exactly the tensors it
names; what a killed write left behind (temporaries, an uncommitted tensors file) is removed by the
next save or resume (clean_folder)."""
from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import torch
from safetensors import safe_open

from pyinterp._atomic import (atomic_write_json, atomic_write_safetensors, kill_point,
                              remove_stale_temporaries, sha256_of_file)

MANIFEST = "checkpoint.json"
FORMAT, VERSION = "pyinterp-sae-checkpoint", 2
_TENSORS_FILE = re.compile(r"^checkpoint-\d+-[0-9a-f]+\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, damaged, or from another run."""


def _committed_tensors_file(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("tensors", {}).get("file")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_tensors_files(folder: Path, keep: str) -> None:
    for path in folder.glob("checkpoint-*.safetensors"):
        if _TENSORS_FILE.match(path.name) and path.name != keep:
            path.unlink(missing_ok=True)


def clean_folder(folder: Path) -> None:
    """Remove killed writers' temporaries, and the tensors files a readable manifest does not name
    (with no readable manifest they stay: they may be all that is left of the run)."""
    folder = Path(folder)
    remove_stale_temporaries(folder)
    committed = _committed_tensors_file(folder)
    if committed:
        _remove_tensors_files(folder, committed)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Commit a checkpoint of `tensors` (all finite: the caller checks) and the JSON `state`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_folder(folder)
    name = f"checkpoint-{state['step']:09d}-{secrets.token_hex(4)}.safetensors"
    digest = atomic_write_safetensors(folder / name, tensors, {"step": str(state["step"])})
    manifest = {"format": FORMAT, "version": VERSION, **state,
                "tensors": {"file": name, "sha256": digest}}
    atomic_write_json(folder / MANIFEST, manifest)
    kill_point("checkpoint-committed")
    _remove_tensors_files(folder, name)  # the previous checkpoint and any a killed write left


def require(mapping: dict, field: str, where) -> object:
    if not isinstance(mapping, dict) or field not in mapping:
        raise CheckpointError(f"resume: {where} has no field {field!r}; it was not written by this "
                              f"version of pyinterp or was edited")
    return mapping[field]


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of the checkpoint committed in `folder`, after checking the manifest's
    format and the tensors file's SHA-256."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"resume: {manifest_path} is not readable JSON ({exc})") from exc
    if require(manifest, "format", manifest_path) != FORMAT or require(manifest, "version", manifest_path) != VERSION:
        raise CheckpointError(f"resume: {manifest_path} is format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r}; this pyinterp reads {FORMAT!r} version {VERSION}")
    described = require(manifest, "tensors", manifest_path)
    tensors_path = folder / str(require(described, "file", f"{manifest_path} 'tensors'"))
    expected = require(described, "sha256", f"{manifest_path} 'tensors'")
    if not tensors_path.is_file():
        raise CheckpointError(f"resume: {tensors_path}, named by {manifest_path}, is missing")
    if sha256_of_file(tensors_path) != expected:
        raise CheckpointError(f"resume: {tensors_path} does not match the SHA-256 recorded in "
                              f"{manifest_path}: the file is damaged")
    try:
        with safe_open(str(tensors_path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"resume: {tensors_path} is not a readable checkpoint ({exc})") from exc
    state = {key: value for key, value in manifest.items() if key not in ("format", "version", "tensors")}
    return tensors, state
