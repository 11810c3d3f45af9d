"""Checkpoints of a training run: save, load, update, the model rebuilt from one, the RNG state.

A checkpoint is one ``torch.save`` dict tagged ``format: coorkern-checkpoint-v1`` holding
only tensors and plain Python values, so it loads with ``torch.load(path,
weights_only=True)`` (no pickled code runs).  It carries the model's weights and
constructor arguments (``model_config``), the run's resolved config, the epoch, and the
optimizer/scheduler/scaler/RNG state that ``--resume`` needs to continue bitwise.
Files are written atomically (:mod:`coorkern.engine.files`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .files import atomic_write, json_default

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_best_checkpoint",
    "best_checkpoint_or_error",
    "update_checkpoint",
    "build_model",
    "model_from_checkpoint",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "coorkern-checkpoint-v1"


# ---------------------------------------------------------------------------
# RNG state (tensors and plain Python values only, so weights_only=True loads it)


def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------
# Checkpoint files


def save_checkpoint(path, *, model, config: dict, epoch: int, optimizer=None, scheduler=None, scaler=None,
                    extra: Optional[dict] = None) -> Path:
    """Atomically write a checkpoint loadable with ``torch.load(path, weights_only=True)``."""
    module = getattr(model, "module", model)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": module.state_dict(),
        "model_config": dict(config["model"]),
        "config": json.loads(json.dumps(config, default=json_default)),
        "epoch": int(epoch),
        "rng": rng_state(),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if extra:
        payload.update(extra)
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint (a file, or a run folder holding ``checkpoint_last.pt``/``checkpoint_best.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no checkpoint_last.pt or checkpoint_best.pt in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable coorkern checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a coorkern checkpoint (missing format tag)")
    ckpt["path"] = str(path)
    return ckpt


def load_best_checkpoint(path, map_location="cpu") -> dict:
    """:func:`load_checkpoint`, taking ``checkpoint_best.pt`` from a run folder (the model to use, with its radii)."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint_best.pt").is_file():
        path = path / "checkpoint_best.pt"
    return load_checkpoint(path, map_location)


def best_checkpoint_or_error(parser: argparse.ArgumentParser, path) -> dict:
    """:func:`load_best_checkpoint`, its errors reported through ``parser.error`` (exit code 2)."""
    try:
        return load_best_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))


def update_checkpoint(path, **entries) -> Path:
    """Add or replace top-level ``entries`` of the checkpoint file ``path`` (atomically)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload.update(entries)
    return atomic_write(path, lambda f: torch.save(payload, f))


# ---------------------------------------------------------------------------
# The model of a checkpoint


def build_model(model_config: dict):
    from ..models import CoorDetector

    # A config written before the ``position`` option existed is a model without positions
    # (today's default for "coor" is "fourier").  Lists from JSON are fine: it keeps tuples itself.
    return CoorDetector(**{"position": "none", **model_config})


def model_from_checkpoint(ckpt: dict, device="cpu"):
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
