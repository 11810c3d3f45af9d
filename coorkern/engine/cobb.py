"""Spine reports: Cobb angles of predicted landmarks in the original images' pixels, and their SMAPE.

The AASCE 2019 challenge measures a spine by its three Cobb angles
(:func:`coorkern.metrics.cobb_angles`) and scores predictions by SMAPE
(:func:`coorkern.metrics.smape`).  Angles change under the anisotropic resize to the
model's input (a 2360 x 854 radiograph becomes 384 x 128), so predictions are mapped back
to the original image's pixels first -- the inverse of the data set's resize, pixel centres
at integers: ``x_original = (x + 0.5) * original / resized - 0.5`` -- and the rule's
S-curve test gets the original height.  Landmark errors of spine data are measured there
too (:func:`original_pixel_scale`), so MRE and the SDR radii (10-40 px,
:data:`coorkern.data.spine.SPINE_THRESHOLDS`) are in pixels of the original image, the
pixels the radii were chosen in.  The report also says on which vertebra the predicted
corners landed (:func:`coorkern.metrics.vertebra_level_shift`): a detector of 17 look-alike
vertebrae fails by whole levels.  :func:`main_curve` gives the two vertebrae of the main
angle for the overlays.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from .. import metrics

__all__ = ["ANGLE_NAMES", "CobbResult", "original_pixel_scale", "to_original", "cobb_report", "format_cobb",
           "main_curve", "angle_fields"]

ANGLE_NAMES = ("main", "second", "third")  # the order of the challenge's angles.csv


class CobbResult(NamedTuple):
    """``summary`` (JSON: SMAPE, mean absolute error per angle, counts) and the per-image angles ``(N, 3)``."""

    summary: dict
    pred: torch.Tensor
    truth: torch.Tensor


def original_pixel_scale(dataset) -> Optional[torch.Tensor]:
    """``(N, 2)`` original pixels per model-input pixel (x, y) of each item, for data sets whose records
    know their image's original size (the spine's); None otherwise."""
    records = getattr(dataset, "records", None)
    if not records or not all(getattr(r, "original_size", (0, 0))[0] > 0 for r in records):
        return None
    h, w = dataset.image_size
    return torch.tensor([[r.original_size[1] / w, r.original_size[0] / h] for r in records], dtype=torch.float64)


def to_original(coords: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Model-input pixels ``(N, L, 2)`` to original pixels with ``scale (N, 2)`` (float64)."""
    return (coords.double() + 0.5) * scale.double()[:, None, :] - 0.5


def _mean(values: torch.Tensor) -> Optional[float]:
    return float(values.mean()) if values.numel() else None


def cobb_report(inference: dict, dataset) -> Optional[CobbResult]:
    """Cobb angles of ``inference["pred"]`` against the ground truth of ``dataset`` (spine records: angles
    and original size); None for other data sets.

    The truth is the record's ``angles.csv`` row, or, where the copy has none, the rule
    applied to the annotated landmarks.  Images whose predicted corners give no angle (a
    vertebra with coinciding sides) are left out of the means and counted.
    """
    records = getattr(dataset, "records", None)
    scale = original_pixel_scale(dataset)
    if scale is None or not all(hasattr(r, "angles") for r in records):
        return None
    heights = torch.tensor([float(r.original_size[0]) for r in records], dtype=torch.float64)
    pred = metrics.cobb_angles(to_original(inference["pred"], scale), heights)
    given = torch.from_numpy(np.stack([np.asarray(r.angles, dtype=np.float64) for r in records]))
    annotated = torch.from_numpy(np.stack([np.asarray(r.landmarks, dtype=np.float64) for r in records]))
    known = torch.isfinite(given).all(-1)
    truth = torch.where(known[:, None], given, metrics.cobb_angles(annotated, heights))
    valid = torch.isfinite(pred).all(-1) & torch.isfinite(truth).all(-1)
    source = ("angles.csv" if bool(known.all()) else "the annotated landmarks" if not bool(known.any())
              else "angles.csv, else the annotated landmarks")
    error = (pred[valid] - truth[valid]).abs()
    shift = metrics.vertebra_level_shift(to_original(inference["pred"], scale), annotated)
    placed = shift[shift != -99]
    summary = {
        "smape": metrics.smape(pred[valid], truth[valid]) if bool(valid.any()) else None,
        "mae_deg": {name: _mean(error[:, j]) for j, name in enumerate(ANGLE_NAMES)},
        "images": int(valid.sum()),
        "images_without_angles": int((~valid).sum()),
        "truth": source,
        "pixels": "original image",
        # Where the predicted corners landed: on their own vertebra, one level off, further.
        "vertebra_level": {"own": _mean((placed == 0).double()), "one_off": _mean((placed.abs() == 1).double()),
                           "further": _mean((placed.abs() > 1).double())},
    }
    return CobbResult(summary, pred, truth)


def format_cobb(summary: dict) -> str:
    """One line: SMAPE and the mean absolute error per angle."""
    if summary["smape"] is None:
        return "Cobb angles: none could be computed from the predicted landmarks"
    errors = ", ".join(f"{name} {summary['mae_deg'][name]:.2f}" for name in ANGLE_NAMES)
    text = (f"Cobb angles ({summary['images']} images, truth from {summary['truth']}): SMAPE "
            f"{summary['smape']:.2f}%, mean absolute error {errors} degrees")
    if summary["images_without_angles"]:
        text += f" ({summary['images_without_angles']} image(s) without predicted angles left out)"
    level = summary.get("vertebra_level") or {}
    if level.get("own") is not None:
        text += (f"; predicted corners on their own vertebra {100 * level['own']:.1f}%, one vertebra off "
                 f"{100 * level['one_off']:.1f}%, further {100 * level['further']:.1f}%")
    return text


def main_curve(landmarks) -> Optional[tuple[int, int, float]]:
    """``(upper, lower, degrees)``: the 0-based vertebrae whose mid-lines make the largest angle (the main
    Cobb angle, chosen as :func:`coorkern.metrics.cobb_angles` does), from ``(L, 2)`` corners (TL, TR, BL,
    BR per vertebra); None when a vertebra has no direction."""
    points = torch.as_tensor(landmarks, dtype=torch.float64).reshape(-1, 4, 2)
    direction = (points[:, 1] + points[:, 3] - points[:, 0] - points[:, 2]) / 2  # left side mid -> right side mid
    length = direction.norm(dim=-1, keepdim=True)
    if not bool(torch.isfinite(direction).all()) or not bool((length > 0).all()):
        return None
    unit = direction / length
    angles = torch.rad2deg(torch.acos((unit @ unit.T).clamp(-1.0, 1.0)))
    column_max, column_arg = angles.max(dim=0)
    degrees, upper = column_max.max(dim=0)
    lower = column_arg[upper]
    first, second = sorted((int(upper), int(lower)))
    return first, second, float(degrees)


def angle_fields(angles) -> dict:
    """``{"main": ..., "second": ..., "third": ...}`` (degrees, 2 decimals; None where not finite)."""
    return {name: (round(float(a), 2) if np.isfinite(float(a)) else None) for name, a in zip(ANGLE_NAMES, angles)}
