"""Atomic file writes for run folders: a reader never sees a half-written checkpoint, JSON or PNG.

Every file a run writes goes through :func:`atomic_write` (temporary file next to the
target, ``fsync``, ``os.replace``), so a run killed mid-write leaves the previous
version of the file in place; :func:`write_json` also turns tensors, numpy scalars
and paths into plain JSON values (:func:`json_default`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_write_bytes", "write_json", "json_default"]


def atomic_write(path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then ``os.replace`` it.

    A process killed mid-write leaves the previous file intact (and at worst a stray
    ``.tmp`` file), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_json(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n").encode())


def json_default(value):
    """``json.dumps(default=...)``: numpy scalars and tensors as numbers/lists, paths as strings."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
