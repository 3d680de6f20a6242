"""Atomic files: safetensors and JSON only (never pickle). Each file is written to a temporary name
in the same folder (`.NAME.tmp-PID`), flushed to disk, then renamed over the target with
os.replace, so a crash at any point leaves either the previous file or the new one, never a torn
one. A temporary left by a killed process is removed by remove_stale_temporaries.

kill_point(name) is the fault-test hook: PYINTERP_KILL_AT=NAME[:N][@RANK] sends SIGKILL to this
process the N-th time (default 1st) it reaches that point (on torch.distributed rank RANK only)."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_kill_point_visits: collections.Counter = collections.Counter()


def kill_point(name: str) -> None:
    spec = os.environ.get("PYINTERP_KILL_AT")
    if not spec:
        return
    target, _, rank = spec.partition("@")
    point, _, count = target.partition(":")
    if point != name or (rank and rank != os.environ.get("RANK", "0")):
        return
    _kill_point_visits[name] += 1
    if _kill_point_visits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself survives a power cut
    finally:
        os.close(descriptor)


def _atomic(path: Path, write) -> str:
    """Write `path` through write(temporary); returns the SHA-256 of what was written."""
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
        digest = sha256_of_file(temporary)
        kill_point("atomic-written")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    kill_point("atomic-renamed")
    _fsync_folder(path.parent)
    return digest


def atomic_write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> str:
    """Returns the file's SHA-256."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return _atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def atomic_write_json(path: Path, value) -> str:
    return _atomic(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2) + "\n"))


def atomic_write_text(path: Path, text: str) -> str:
    return _atomic(path, lambda temporary: temporary.write_text(text))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of `folder` whose writer is no longer running (killed mid-write);
    a live writer's (this process's included) are left alone. Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
