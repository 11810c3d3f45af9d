"""Split-conformal uncertainty radii per landmark: how far off a predicted landmark may be.

Calibration (:func:`calibrate`): on a held-out calibration set (the training run's
validation split) with radial errors ``e_i`` of one landmark, the nonconformity score is
``s_i = e_i / u_i`` where ``u_i`` is a per-prediction scale (``score="none"``: 1;
``score="peak"``: 1 / heatmap peak probability, so low-confidence predictions get wider
radii).  The radius for coverage ``1 - alpha`` is ``q * u`` with ``q`` the
``ceil((n + 1)(1 - alpha))``-th smallest score (infinite when that exceeds ``n``).  For
a new image exchangeable with the calibration images, the true landmark then lies within
the radius with probability at least ``1 - alpha`` (Vovk et al.; Angelopoulos & Bates,
"A Gentle Introduction to Conformal Prediction", 2021), per landmark.

Errors and radii are in pixels of the model's input (the resized image), where the
network works; :mod:`coorkern.predict` maps them to the input image's pixels and mm.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["SCORES", "calibrate", "prediction_scale", "radii", "empirical_coverage", "min_calibration_size"]

SCORES = ("none", "peak")
_MIN_PEAK = 1e-3  # a peak probability below this is treated as this (bounded radii)


def prediction_scale(score: str, confidence: torch.Tensor) -> torch.Tensor:
    """The per-prediction scale ``u`` of ``score`` for heatmap peak probabilities ``confidence``."""
    if score == "none":
        return torch.ones_like(confidence, dtype=torch.float64)
    if score == "peak":
        return 1.0 / confidence.double().clamp(_MIN_PEAK, 1.0)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def min_calibration_size(coverage: float) -> int:
    """The fewest calibration errors that give a finite radius: ``ceil((n + 1) c) <= n``."""
    n = max(1, math.ceil(coverage / (1.0 - coverage) - 1e-9))
    while math.ceil((n + 1) * coverage) > n:
        n += 1
    return n


def calibrate(errors: torch.Tensor, coverage: float = 0.9, confidence: Optional[torch.Tensor] = None,
              score: str = "none") -> dict:
    """Per-landmark conformal quantiles from calibration ``errors (N, L)`` (NaN = missing landmark).

    ``confidence (N, L)`` (heatmap peaks) is needed for ``score="peak"``.  Returns a plain
    dict (storable in a checkpoint): ``coverage``, ``score``, ``quantile`` (L floats, the
    radius for scale 1), ``count`` (calibration errors per landmark), ``unit``.
    """
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    if errors.dim() != 2:
        raise ValueError(f"errors must have shape (N, L), got {tuple(errors.shape)}")
    if score != "none" and confidence is None:
        raise ValueError(f"score={score!r} needs the confidence (N, L) of the calibration predictions")
    scale = prediction_scale(score, confidence if confidence is not None else errors)
    scores = errors.double().cpu() / scale.cpu()
    quantiles, counts = [], []
    for column in scores.T:
        valid = torch.sort(column[~torch.isnan(column)]).values
        n = int(valid.numel())
        k = math.ceil((n + 1) * coverage)
        quantiles.append(float(valid[k - 1]) if 0 < k <= n else math.inf)
        counts.append(n)
    return {"coverage": float(coverage), "score": score, "quantile": quantiles, "count": counts,
            "unit": "px of the model input"}


def radii(calibration: dict, confidence: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` radii (model-input pixels) of predictions with peak probabilities ``confidence (N, L)``."""
    quantile = torch.tensor(calibration["quantile"], dtype=torch.float64)
    if confidence.shape[-1] != quantile.numel():
        raise ValueError(f"the calibration has {quantile.numel()} landmarks, the predictions "
                         f"{confidence.shape[-1]}")
    return prediction_scale(calibration["score"], confidence.cpu()) * quantile


def empirical_coverage(errors: torch.Tensor, radius: torch.Tensor) -> dict:
    """Fraction of ``errors (N, L)`` within ``radius (N, L)``, overall and per landmark (NaN errors left out)."""
    valid = ~torch.isnan(errors)
    inside = (errors.double().cpu() <= radius.double().cpu()) & valid.cpu()
    per_landmark = inside.sum(0).double() / valid.sum(0).clamp_min(1).double()
    return {"overall": float(inside.sum()) / max(int(valid.sum()), 1),
            "per_landmark": [float(v) for v in per_landmark],
            "mean_radius": float(radius[valid].double().mean()) if bool(valid.any()) else math.nan}
