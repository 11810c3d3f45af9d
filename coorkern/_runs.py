"""Helpers shared by the commands: atomic files, checkpoints, overlays, argparse types and help."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes",
    "write_json",
    "save_checkpoint",
    "load_checkpoint",
    "load_best_checkpoint",
    "best_checkpoint_or_error",
    "rng_state",
    "set_rng_state",
    "save_overlay",
    "render_overlay",
    "update_checkpoint",
    "build_model",
]


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
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with defaults shown, except the empty ones (None/False: nothing to show)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


_INVOCATION = {"console_script": False}  # set by coorkern.cli while it runs a subcommand


def prog(command: str) -> str:
    """The command name for ``--help``: ``coorkern <command>`` under the console script, else ``python -m``."""
    return f"coorkern {command}" if _INVOCATION["console_script"] else f"python -m coorkern.{command}"


def description(doc: str) -> str:
    """The first paragraph of a module docstring, without reST markup, for ``--help``."""
    return doc.split("\n\n")[0].replace("``", "")


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
# Checkpoints


def save_checkpoint(path, *, model, config: dict, epoch: int, optimizer=None, scheduler=None, scaler=None,
                    extra: Optional[dict] = None) -> Path:
    """Atomically write a checkpoint loadable with ``torch.load(path, weights_only=True)``."""
    module = getattr(model, "module", model)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    payload = {
        "format": "coorkern-checkpoint-v1",
        "model": module.state_dict(),
        "model_config": dict(config["model"]),
        "config": json.loads(json.dumps(config, default=_json_default)),
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != "coorkern-checkpoint-v1":
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


def build_model(model_config: dict):
    from .models import CoorDetector

    return CoorDetector(**model_config)  # (lists from JSON are fine: it keeps tuples itself)


def model_from_checkpoint(ckpt: dict, device="cpu"):
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# Overlays


def render_overlay(image: torch.Tensor, truth: Optional[torch.Tensor] = None, pred: Optional[torch.Tensor] = None,
                   label: Optional[str] = None, scale: int = 1, radii: Optional[torch.Tensor] = None):
    """RGB PIL image: a grey image with ground truth (green) and predicted (red) landmarks.

    ``image`` (1, H, W) or (H, W), any range (stretched to 0-255); landmarks (L, 2) pixels;
    ``radii`` (L,) pixels: a red circle of that radius around each prediction (uncertainty).
    """
    from PIL import Image, ImageDraw

    img = image.detach().float().cpu().reshape(image.shape[-2:])
    lo, hi = torch.quantile(img.flatten(), torch.tensor([0.01, 0.99]))
    grey = ((img - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    canvas = Image.fromarray(grey, mode="L").convert("RGB")
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    radius = max(2, round(min(canvas.size) / 128))

    def points(lms):
        return [] if lms is None else [
            (float(x) * scale + (scale - 1) / 2, float(y) * scale + (scale - 1) / 2)
            for x, y in lms.detach().float().cpu().tolist() if x == x and y == y
        ]

    truth_pts, pred_pts = points(truth), points(pred)
    if truth is not None and pred is not None:
        for t, p in zip(truth.tolist(), pred.tolist()):
            if all(v == v for v in t + p):
                draw.line([(t[0] * scale, t[1] * scale), (p[0] * scale, p[1] * scale)], fill=(255, 255, 0))
    for (x, y) in truth_pts:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(0, 255, 0))
    for (x, y) in pred_pts:
        draw.line([(x - radius, y), (x + radius, y)], fill=(255, 0, 0))
        draw.line([(x, y - radius), (x, y + radius)], fill=(255, 0, 0))
    if radii is not None and pred is not None:
        for (x, y), r in zip(pred.detach().double().cpu().tolist(), radii.detach().double().cpu().tolist()):
            if all(v == v and abs(v) != float("inf") for v in (x, y, r)):
                x, y, r = x * scale + (scale - 1) / 2, y * scale + (scale - 1) / 2, r * scale
                draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 80, 80))
    if label:
        draw.text((3, 3), label, fill=(255, 255, 0))
    return canvas


def save_overlay(path, image: torch.Tensor, truth: Optional[torch.Tensor] = None,
                 pred: Optional[torch.Tensor] = None, label: Optional[str] = None, scale: int = 1,
                 radii: Optional[torch.Tensor] = None) -> Path:
    """PNG file of :func:`render_overlay`."""
    return atomic_write_bytes(path, _png_bytes(render_overlay(image, truth, pred, label, scale, radii)))


def _png_bytes(image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
