"""Heatmap decoding and landmark metrics (MRE, SDR).

* :func:`decode_heatmaps` -- argmax plus sub-pixel refinement by a separable quadratic
  fit of the log-heatmap around the peak (exact for Gaussian peaks), vectorized over
  ``(B, L)``; returns ``(x, y)`` in heatmap pixels and a confidence (peak probability).
* :func:`radial_errors` -- per-landmark Euclidean errors in mm (pixel spacing) or px.
* :func:`landmark_metrics` -- MRE (mean, std, median) and SDR at radii, per landmark
  and overall; NaN (missing) ground truth is left out.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._checks import check_rank, check_tensor

__all__ = ["decode_heatmaps", "radial_errors", "landmark_metrics", "format_table", "mean_shape_baseline"]


def decode_heatmaps(heatmaps: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmark positions from ``(B, L, H, W)`` heatmaps.

    ``logits=True``: the model's logits (the log-probability is ``logsigmoid``);
    ``logits=False``: probabilities/heatmap values in ``(0, 1]``.  Returns
    ``coords (B, L, 2)`` as ``(x, y)`` pixel coordinates (pixel centres at integers) and
    ``confidence (B, L)`` = the peak probability.  The peak's offset along each axis is
    the vertex of the parabola through the log-values at ``-1, 0, +1`` (clamped to
    ±0.5 px; no refinement at the border or where the log-heatmap is not concave).
    """
    heatmaps = check_tensor("heatmaps", heatmaps)
    check_rank("heatmaps", heatmaps, 4, "(B, L, H, W)")
    b, l, h, w = heatmaps.shape
    x = heatmaps.detach().float()
    score = F.logsigmoid(x) if logits else torch.log(x.clamp_min(1e-30))
    flat = score.reshape(b, l, h * w)
    peak, index = flat.max(-1)
    row, col = index // w, index % w

    def gather(dr, dc):
        r = (row + dr).clamp(0, h - 1)
        c = (col + dc).clamp(0, w - 1)
        return flat.gather(-1, (r * w + c).unsqueeze(-1)).squeeze(-1)

    def offset(minus, plus, inside):
        curvature = minus - 2 * peak + plus
        ok = inside & (curvature < 0) & torch.isfinite(curvature)
        delta = 0.5 * (minus - plus) / torch.where(ok, curvature, torch.ones_like(curvature))
        return torch.where(ok, delta.clamp(-0.5, 0.5), torch.zeros_like(delta))

    dx = offset(gather(0, -1), gather(0, 1), (col > 0) & (col < w - 1))
    dy = offset(gather(-1, 0), gather(1, 0), (row > 0) & (row < h - 1))
    coords = torch.stack((col.float() + dx, row.float() + dy), -1)
    confidence = peak.exp()
    return coords, confidence


def radial_errors(pred: torch.Tensor, truth: torch.Tensor, spacing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, L)`` Euclidean distances; in mm with ``spacing (B, 2)`` (mm/pixel in x, y), else px.

    A sample whose spacing is NaN is measured in pixels; a missing (NaN) ground-truth
    landmark gives NaN.
    """
    diff = (pred.double() - truth.double())
    if spacing is not None:
        s = spacing.double().reshape(-1, 1, 2).to(diff.device)
        s = torch.where(torch.isnan(s), torch.ones_like(s), s)
        diff = diff * s
    return diff.norm(dim=-1)


def _summary(errors: torch.Tensor, thresholds: Sequence[float]) -> dict:
    valid = errors[~torch.isnan(errors)]
    n = int(valid.numel())
    if n == 0:
        return {"mre": float("nan"), "std": float("nan"), "median": float("nan"), "count": 0,
                "sdr": {_key(t): float("nan") for t in thresholds}}
    return {
        "mre": float(valid.mean()),
        "std": float(valid.std(unbiased=False)),
        "median": float(valid.median()),
        "count": n,
        "sdr": {_key(t): float((valid <= t).double().mean() * 100) for t in thresholds},
    }


def _key(threshold: float) -> str:
    return f"{float(threshold):g}"


def landmark_metrics(errors: torch.Tensor, thresholds: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
                     unit: str = "mm") -> dict:
    """MRE/SDR from ``(N, L)`` radial errors (NaN = missing, ignored).

    Returns ``{"unit", "thresholds", "overall": {...}, "per_landmark": [{...}, ...]}`` where
    each ``{...}`` holds ``mre``, ``std``, ``median``, ``count`` and ``sdr`` (percent of
    errors ``<=`` each radius, keyed by the radius as a string).
    """
    if errors.dim() != 2:
        raise ValueError(f"errors must have shape (N, L), got {tuple(errors.shape)}")
    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not (t > 0 and math.isfinite(t)) for t in thresholds):
        raise ValueError(f"thresholds must be positive finite numbers, got {thresholds}")
    return {
        "unit": unit,
        "thresholds": thresholds,
        "overall": _summary(errors.reshape(-1), thresholds),
        "per_landmark": [_summary(errors[:, j], thresholds) for j in range(errors.shape[1])],
    }


def unit_of(spacing: torch.Tensor) -> str:
    """``"mm"`` when every sample's spacing is known, ``"px"`` when none is, else an error."""
    known = ~torch.isnan(spacing).any(-1)
    if bool(known.all()):
        return "mm"
    if not bool(known.any()):
        return "px"
    raise ValueError("some samples have a pixel spacing and others do not: metrics would mix mm and px")


def mean_shape_baseline(train_landmarks: torch.Tensor) -> torch.Tensor:
    """The naive baseline: the mean position of each landmark over the training set, ``(L, 2)``."""
    return torch.nanmean(train_landmarks.double(), dim=0).float()


def format_table(results: dict, baseline: Optional[dict] = None, per_landmark: bool = False) -> str:
    """Text table of MRE/SDR (model, and the baseline side by side when given)."""
    unit = results["unit"]
    thresholds = [_key(t) for t in results["thresholds"]]
    cols = ["", f"MRE ({unit})", "std"] + [f"SDR {t}{unit}" for t in thresholds]
    rows = []

    def row(name, s):
        return [name, f"{s['mre']:.3f}", f"{s['std']:.3f}"] + [f"{s['sdr'][t]:.2f}%" for t in thresholds]

    rows.append(row("model", results["overall"]))
    if baseline is not None:
        rows.append(row("baseline (mean shape)", baseline["overall"]))
    if per_landmark:
        for j, s in enumerate(results["per_landmark"]):
            rows.append(row(f"  landmark {j}", s))
    widths = [max(len(r[i]) for r in [cols] + rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [cols] + rows]
    return "\n".join(lines)
