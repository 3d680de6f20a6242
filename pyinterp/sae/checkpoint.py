"""Atomic files: safetensors and JSON only (never pickle). Each file is written to a temporary name
in the same folder, flushed to disk, then renamed over the target with os.replace, so a crash at
any point leaves either the previous file or the new one, never a torn one."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
METADATA_KEY = "pyinterp_checkpoint"


def _atomic(path: Path, write) -> None:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # safetensors writes owner-only files; keep the mode a plain open() gives (the umask's).
        with open(temporary, "wb"):
            pass
        mode = stat.S_IMODE(os.stat(temporary).st_mode)
        write(temporary)
        os.chmod(temporary, mode)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def atomic_write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    _atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def atomic_write_json(path: Path, value) -> None:
    _atomic(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2) + "\n"))


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """One self-contained checkpoint: tensors plus the JSON state in the safetensors metadata (what
    resume reads), and the same JSON beside it for people."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(folder / CHECKPOINT_FILE, tensors, {METADATA_KEY: json.dumps(state)})
    atomic_write_json(folder / CHECKPOINT_JSON, state)


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"resume: {path} is not a readable checkpoint ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise ValueError(f"resume: {path} has no pyinterp training state in its metadata")
    return tensors, json.loads(metadata[METADATA_KEY])
