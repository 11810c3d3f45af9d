"""Heatmap losses of ``(B, L, H, W)`` logits against Gaussian targets at landmark coordinates.

The paper's central loss is the fused op :func:`coorkern.central_loss_from_landmarks`;
this module puts the baselines of the paper's Table II next to it behind one function,
:func:`heatmap_loss`:

* ``central`` -- the fused central loss (targets built in-kernel, no target tensor);
* ``bce``     -- binary cross-entropy with logits against the Gaussian heatmaps;
* ``wbce``    -- BCE with the positives weighted: by default the background/peak area ratio
  ``H*W / (2 pi sigma^2)``, or a given ``pos_weight`` (``train --pos-weight``; the ratio, about
  2,000 at the cpu profile's 256x208 maps, saturates a disc of about 4 sigma around each peak);
* ``focal``   -- focal loss (Lin et al.) with gamma 2.

The baselines build the target heatmaps explicitly with
:func:`coorkern.reference.gaussian_heatmaps`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_rank, check_tensor
from .ops.central_loss import central_loss_from_landmarks
from .reference import gaussian_heatmaps

__all__ = ["LOSSES", "heatmap_loss", "bce_loss", "weighted_bce_loss", "focal_loss", "area_ratio"]

LOSSES = ("central", "bce", "focal", "wbce")


def _targets(logits: torch.Tensor, landmarks: torch.Tensor, sigma: float) -> torch.Tensor:
    h, w = logits.shape[-2:]
    return gaussian_heatmaps(landmarks, h, w, sigma).to(logits.dtype)


def bce_loss(logits: torch.Tensor, landmarks: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean binary cross-entropy with logits against Gaussian heatmaps (peak 1) at ``landmarks``."""
    return F.binary_cross_entropy_with_logits(logits, _targets(logits, landmarks, sigma))


def area_ratio(height: int, width: int, sigma: float) -> float:
    """``H*W / (2 pi sigma^2)``: map area over the Gaussian peak's area, weighted BCE's default weight."""
    return height * width / (2 * math.pi * sigma * sigma)


def weighted_bce_loss(logits: torch.Tensor, landmarks: torch.Tensor, sigma: float,
                      pos_weight: Optional[float] = None) -> torch.Tensor:
    """BCE with the positive term weighted by ``pos_weight`` (default :func:`area_ratio` of the map)."""
    if pos_weight is None:
        pos_weight = area_ratio(*logits.shape[-2:], sigma)
    elif not (isinstance(pos_weight, (int, float)) and math.isfinite(pos_weight) and pos_weight > 0):
        raise ValueError(f"pos_weight must be a finite number > 0 (or None: the area ratio), got {pos_weight!r}")
    # torch.full, not new_tensor: a fill on the device, no host-to-device copy in a training step.
    weight = torch.full((), float(pos_weight), dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, _targets(logits, landmarks, sigma), pos_weight=weight)


def focal_loss(logits: torch.Tensor, landmarks: torch.Tensor, sigma: float, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss ``(1 - p_t)^gamma * BCE`` against Gaussian heatmaps (soft targets)."""
    target = _targets(logits, landmarks, sigma)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return (ce * (1 - p_t) ** gamma).mean()


def heatmap_loss(kind: str, logits: torch.Tensor, landmarks: torch.Tensor, sigma: float,
                 r: float = 2.0, pos_weight: Optional[float] = None) -> torch.Tensor:
    """Mean loss ``kind`` (one of :data:`LOSSES`) of ``(B, L, H, W)`` logits, computed in float32.

    ``landmarks`` ``(B, L, 2)`` are ``(x, y)`` heatmap pixels (NaN = missing); ``sigma``
    the Gaussian target's width in pixels; ``r`` the central loss exponent; ``pos_weight``
    weighted BCE's positive weight (``None``: :func:`area_ratio`; used by ``wbce`` only).
    """
    check_choice("kind", kind, LOSSES)
    check_tensor("logits", logits)
    check_rank("logits", logits, 4, "(B, L, H, W)")
    logits = logits.float()
    if kind == "central":
        return central_loss_from_landmarks(logits, landmarks, sigma=sigma, r=r)
    if kind == "bce":
        return bce_loss(logits, landmarks, sigma)
    if kind == "wbce":
        return weighted_bce_loss(logits, landmarks, sigma, pos_weight)
    return focal_loss(logits, landmarks, sigma)
