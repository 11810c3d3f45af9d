"""Heatmap decoding and landmark metrics (MRE, SDR).

* :func:`decode_heatmaps` -- argmax plus sub-pixel refinement by a separable quadratic
  fit of the log-heatmap around the peak (exact for Gaussian peaks), vectorized over
  ``(B, L)``; returns ``(x, y)`` in heatmap pixels and a confidence (peak probability).
* :func:`radial_errors` -- per-landmark Euclidean errors in mm (pixel spacing) or px.
* :func:`landmark_metrics` -- MRE (mean, std, median) and SDR at radii, per landmark
  and overall; NaN (missing) ground truth is left out.
* :func:`cobb_angles` -- the three Cobb angles of a spine's 68 vertebra corners by the
  AASCE 2019 challenge's rule; :func:`smape` -- the challenge's SMAPE of angles (percent);
  :func:`vertebra_level_shift` -- on which vertebra each predicted corner landed.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._checks import check_rank, check_tensor

__all__ = ["decode_heatmaps", "radial_errors", "landmark_metrics", "format_table", "mean_shape_baseline",
           "cobb_angles", "smape", "vertebra_level_shift"]


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


# ---------------------------------------------------------------------------
# Spine: Cobb angles and SMAPE (AASCE 2019 challenge)


def _as_float64(name: str, value) -> tuple[torch.Tensor, bool]:
    """``value`` as a float64 tensor, and whether it came as a tensor (else numpy/list)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {value.dtype}")
        return value.detach().to(torch.float64), True
    try:
        import numpy as np

        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or nested numbers, got "
                        f"{type(value).__name__}") from None
    return torch.from_numpy(array), False


def _returned(result: torch.Tensor, like, was_tensor: bool):
    if was_tensor:
        return result.to(like.dtype if like.is_floating_point() else torch.float64)
    return result.numpy()


def _acos_rounded(cosine: torch.Tensor) -> torch.Tensor:
    # The challenge's MATLAB rounds every cosine to 8 decimals (``roundn(x, -8)``) before ``acos``.
    return torch.acos((torch.round(cosine * 1e8) / 1e8).clamp(-1.0, 1.0))


def _is_s_shaped(mid: torch.Tensor) -> torch.Tensor:
    """The challenge's ``isS`` on ``(N, P, 2)`` end-plate centres: ``(N,)`` bool.

    ``ll_i = (y_i - y_P) / (y_1 - y_P) - (x_i - x_P) / (x_1 - x_P)`` for ``i = 1..P-2``
    compares each point with the straight line from the first to the last; the spine is
    "S" when ``sum(ll ll^T) != sum(|ll ll^T|)``, i.e. when the points lie on both sides of
    that line (or ``ll`` is not finite: a vertical first-to-last line, as in MATLAB).
    """
    first, last = mid[:, :1], mid[:, -1:]
    inner = mid[:, :-2]
    ll = (inner[..., 1] - last[..., 1]) / (first[..., 1] - last[..., 1]) \
        - (inner[..., 0] - last[..., 0]) / (first[..., 0] - last[..., 0])
    pair = ll.unsqueeze(-1) * ll.unsqueeze(-2)
    return ~(pair.sum((-1, -2)) == pair.abs().sum((-1, -2)))


def cobb_angles(landmarks, image_height):
    """The three Cobb angles (degrees) of spines by the AASCE 2019 challenge's rule.

    ``landmarks``: ``(..., 68, 2)`` pixel coordinates ``(x, y)`` (y downwards), 17 vertebrae
    from the top, four corners each in the order top-left, top-right, bottom-left,
    bottom-right (any multiple of 4, at least 8, is accepted; the challenge has 68).
    ``image_height``: the original image's height in pixels, a number or ``(...)``.
    Returns ``(..., 3)`` in the order of the challenge's ``angles.csv``: the main curve,
    then the two secondary curves; a torch tensor (the landmarks' floating dtype) for a
    tensor input, else a float64 numpy array.  Computed in float64; spines with
    non-finite landmarks or a vertebra whose left and right sides coincide give NaN.

    The rule (the challenge's MATLAB ``angleCal``, reproduced here; it reproduces the
    training ``angles.csv`` to < 0.005 degree, the file's own rounding):

    1. each vertebra's vector runs from the mid-point of its left side (top-left and
       bottom-left corners) to that of its right side; the angle between two vertebrae is
       ``acos`` of the cosine of their vectors, rounded to 8 decimals (no clipping at 0, so
       angles over 90 degrees are kept);
    2. main angle: the largest angle between any two vertebrae; ``upper`` / ``lower``
       are the pair (the first column of the angle matrix holding the maximum, and the
       first row holding it in that column);
    3. the end-plate centres (mid-points of the top and of the bottom corner pairs, 34
       points) decide whether the spine is S-shaped (:func:`_is_s_shaped`);
    4. not S: second = angle(vertebra 1, upper), third = angle(last vertebra, lower);
    5. S: second = the largest angle between ``upper`` and a vertebra at or above it
       (that vertebra: ``top``); third, when the bottom end-plate centres of ``upper`` and
       ``lower`` have ``y_upper + y_lower < image_height`` (the main curve in the upper
       part), the largest angle between ``lower`` and a vertebra at or below it, otherwise
       the largest angle between ``top`` and a vertebra at or above it.

    Ties resolve to the first index, as MATLAB's ``max`` does.
    """
    points, was_tensor = _as_float64("landmarks", landmarks)
    if points.dim() < 2 or points.shape[-1] != 2 or points.shape[-2] < 8 or points.shape[-2] % 4:
        raise ValueError(f"landmarks must have shape (..., 68, 2) (4 corners per vertebra), got "
                         f"{tuple(points.shape)}")
    batch = points.shape[:-2]
    height, _ = _as_float64("image_height", image_height)
    height = height.to(points.device)
    try:
        height = torch.broadcast_to(height, batch)
    except RuntimeError:
        raise ValueError(f"image_height must be a number or have the landmarks' leading shape {tuple(batch)}, "
                         f"got {tuple(height.shape)}") from None
    if not bool((height > 0).all()) or not bool(torch.isfinite(height).all()):
        raise ValueError("image_height must be positive and finite")
    p = points.reshape(-1, points.shape[-2], 2)
    h = height.reshape(-1)
    n, num_vertebrae = p.shape[0], p.shape[1] // 4
    rows = torch.arange(n, device=p.device)
    # 1. vertebra vectors and the angle matrix
    left = (p[:, 0::4] + p[:, 2::4]) / 2
    right = (p[:, 1::4] + p[:, 3::4]) / 2
    vec = right - left  # (N, V, 2)
    norm = vec.norm(dim=-1)
    angles = _acos_rounded((vec @ vec.transpose(1, 2)) / (norm.unsqueeze(-1) * norm.unsqueeze(-2)))
    invalid = ~torch.isfinite(angles).flatten(1).all(1)
    angles = torch.where(invalid.view(-1, 1, 1), torch.zeros_like(angles), angles)
    # 2. main angle: MATLAB [maxt, pos1] = max(angles) (per column); [pt, pos2] = max(maxt)
    col_max, col_argmax = angles.max(dim=1)
    main, upper = col_max.max(dim=1)
    lower = col_argmax[rows, upper]
    # 3. S-shape test on the 2V end-plate centres
    plates = (p[:, 0::2] + p[:, 1::2]) / 2
    s_shaped = _is_s_shaped(plates)
    index = torch.arange(num_vertebrae, device=p.device)

    def row_max(row: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = angles[rows, row].masked_fill(~keep, float("-inf"))
        return values.max(dim=1)

    # 4. not S
    second_c = angles[rows, 0, upper]
    third_c = angles[rows, num_vertebrae - 1, lower]
    # 5. S
    second_s, top = row_max(upper, index.unsqueeze(0) <= upper.unsqueeze(1))
    third_up, _ = row_max(lower, index.unsqueeze(0) >= lower.unsqueeze(1))
    third_top, _ = row_max(top, index.unsqueeze(0) <= top.unsqueeze(1))
    upper_part = (plates[rows, 2 * upper + 1, 1] + plates[rows, 2 * lower + 1, 1]) < h
    second = torch.where(s_shaped, second_s, second_c)
    third = torch.where(s_shaped, torch.where(upper_part, third_up, third_top), third_c)
    result = torch.rad2deg(torch.stack((main, second, third), dim=-1))
    result = result.masked_fill(invalid.unsqueeze(-1), float("nan"))
    return _returned(result.reshape(*batch, 3), landmarks, was_tensor)


def smape(pred_angles, true_angles, per_image: bool = False):
    """The AASCE challenge's symmetric mean absolute percentage error of Cobb angles, in percent.

    ``SMAPE = 100 / N * sum_i (sum_j |p_ij - t_ij|) / (sum_j (p_ij + t_ij))`` over the N
    images (all leading dims) and the angles ``j`` (last dim, 3 in the challenge).  Both
    inputs have the same shape ``(..., 3)``, in degrees.  An image whose predicted and
    true angles are all 0 counts as 0 (the formula's 0/0; perfect agreement).  Returns a
    Python float (``per_image=True``: the ``(...)`` per-image percentages, a tensor for
    tensor inputs, else a numpy array).
    """
    pred, pred_tensor = _as_float64("pred_angles", pred_angles)
    true, _ = _as_float64("true_angles", true_angles)
    if pred.dim() < 1 or pred.shape[-1] < 1:
        raise ValueError(f"pred_angles must have shape (..., 3), got {tuple(pred.shape)}")
    if true.shape != pred.shape:
        raise ValueError(f"true_angles must have the shape of pred_angles {tuple(pred.shape)}, got "
                         f"{tuple(true.shape)}")
    true = true.to(pred.device)
    numerator = (pred - true).abs().sum(-1)
    denominator = (pred + true).sum(-1)
    per = 100 * torch.where(numerator == 0, torch.zeros_like(numerator), numerator / denominator)
    if per_image:
        return _returned(per, pred_angles, pred_tensor)
    if per.numel() == 0:
        raise ValueError("smape needs at least one image")
    return float(per.mean())


def vertebra_level_shift(pred, truth):
    """On which vertebra each predicted corner of a spine landed, relative to its own: ``(..., 68)`` integers.

    ``pred`` and ``truth`` are ``(..., 68, 2)`` corners in the challenge's order (17
    vertebrae from the top, 4 corners each).  For predicted corner ``4 v + c`` the result is
    ``w - v``, where vertebra ``w`` holds the true corner of the same kind ``c`` nearest to
    it: 0 on its own vertebra, -1 one vertebra up, +1 one down.  Repeated structures are
    where a heatmap detector fails by whole levels (a prediction on the right vertebra
    with a small error is a different failure from one on the neighbour), and the Cobb
    angle suffers most from the second.  NaN corners give -99 (no level).  Returns a
    tensor for tensor inputs, else a numpy array.
    """
    p, pred_tensor = _as_float64("pred", pred)
    t, _ = _as_float64("truth", truth)
    if p.dim() < 2 or tuple(p.shape[-2:]) != (68, 2):
        raise ValueError(f"pred must have shape (..., 68, 2) (17 vertebrae x 4 corners), got {tuple(p.shape)}")
    if t.shape != p.shape:
        raise ValueError(f"truth must have the shape of pred {tuple(p.shape)}, got {tuple(t.shape)}")
    t = t.to(p.device)
    batch = p.shape[:-2]
    p = p.reshape(*batch, 17, 4, 1, 2)  # predicted corner (v, c)
    t = t.reshape(*batch, 17, 4, 2).transpose(-3, -2).unsqueeze(-4)  # true corners of kind c: (1, 4, 17 w, 2)
    distance = (p - t).norm(dim=-1)  # (..., 17 v, 4 c, 17 w)
    nearest = torch.nan_to_num(distance, nan=math.inf).argmin(dim=-1)
    shift = nearest - torch.arange(17, device=p.device).view(17, 1)
    shift = torch.where(torch.isnan(distance).all(dim=-1), torch.full_like(shift, -99), shift).reshape(*batch, 68)
    return shift if pred_tensor else shift.numpy()
