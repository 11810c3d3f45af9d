"""Run-folder plots with matplotlib: learning curves and held-out error per landmark.

* :func:`plot_curves` -- ``curves.png``: train/validation loss and validation MRE per epoch;
* :func:`plot_per_landmark` -- ``per_landmark.png``: mean radial error per landmark with
  its standard deviation (error bars) and median (dots); the figure widens with the
  landmark count (the spine's 68 get narrower bars and upright tick labels).

Figures are drawn on the Agg canvas (no display, no global pyplot state) and written
atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch

from .engine.files import atomic_write_bytes

__all__ = ["plot_curves", "plot_per_landmark"]


def _figure(width: float, height: float, columns: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _save(fig, path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_curves(history: Sequence[dict], path) -> Path:
    """Train/validation loss and validation MRE per epoch from the rows of ``metrics.json``."""
    fig, (ax_loss, ax_mre) = _figure(10, 3.8, 2)
    epochs = [row["epoch"] for row in history]
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        values = [row.get(key, float("nan")) for row in history]
        ax_loss.plot(epochs, values, marker="o", markersize=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    mre_keys = [k for k in (history[0] if history else {}) if k.startswith("val_mre_")]
    for key in mre_keys:
        ax_mre.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", markersize=3,
                    color="tab:red")
        ax_mre.set(ylabel=f"MRE ({key.rsplit('_', 1)[-1]})")
    ax_mre.set(xlabel="epoch", title="validation MRE")
    for ax in (ax_loss, ax_mre):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_per_landmark(errors: torch.Tensor, path, unit: str = "mm", title: str = "held-out error per landmark") -> Path:
    """Bars: mean radial error per landmark of ``errors (N, L)`` (NaN = missing), std as error bars, median dots."""
    errors = errors.double().cpu()
    valid = ~torch.isnan(errors)
    count = valid.sum(0).clamp_min(1)
    filled = torch.where(valid, errors, torch.zeros_like(errors))
    mean = filled.sum(0) / count
    std = (torch.where(valid, errors - mean, torch.zeros_like(errors)).pow(2).sum(0) / (count - 1).clamp_min(1)).sqrt()
    median = torch.nanmedian(errors, dim=0).values
    labels = [str(i + 1) for i in range(errors.shape[1])]
    many = len(labels) > 30  # 0.4 in per bar up to 30 landmarks (14 in); beyond, 0.22 in (68 landmarks: 17 in)
    fig, (ax,) = _figure(max(6.0, (0.22 if many else 0.4) * len(labels) + 2), 3.8)
    ax.bar(labels, mean.tolist(), yerr=std.tolist(), capsize=1.5 if many else 3, color="tab:blue", alpha=0.8,
           label="mean ± std")
    ax.plot(labels, median.tolist(), "o", color="black", markersize=3 if many else 4, label="median")
    if many:
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.set_xlim(-0.8, len(labels) - 0.2)
    ax.set(xlabel="landmark", ylabel=f"radial error ({unit})", title=f"{title} ({errors.shape[0]} images)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)
