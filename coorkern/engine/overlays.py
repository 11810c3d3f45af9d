"""Overlay images: predicted (red) vs true (green) landmarks drawn on a radiograph.

Used for the run folder's ``overlays/*.png``, ``evaluate``'s and ``predict``'s PNGs and
the TensorBoard validation images, so every place shows landmarks and uncertainty
circles the same way.  Spine landmarks (four corners per vertebra: top-left, top-right,
bottom-left, bottom-right) can be drawn as vertebrae, with the two mid-lines that make the
main Cobb angle and its value.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from .files import atomic_write_bytes

__all__ = ["render_overlay", "save_overlay"]


def render_overlay(image: torch.Tensor, truth: Optional[torch.Tensor] = None, pred: Optional[torch.Tensor] = None,
                   label: Optional[str] = None, scale: int = 1, radii: Optional[torch.Tensor] = None, *,
                   vertebrae: bool = False, cobb: Optional[tuple] = None):
    """RGB PIL image: a grey image with ground truth (green) and predicted (red) landmarks.

    ``image`` (1, H, W) or (H, W), any range (stretched to 0-255); landmarks (L, 2) pixels;
    ``radii`` (L,) pixels: a red circle of that radius around each prediction (uncertainty).
    ``vertebrae``: every four landmarks (TL, TR, BL, BR) are drawn as a quadrilateral;
    ``cobb`` ``(upper, lower, degrees)``: the mid-lines of those two vertebrae of the
    prediction (of the truth without one), extended, and the angle written beside them.
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
    if truth is not None and pred is not None and not vertebrae:  # (vertebra outlines show the errors)
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
    if vertebrae:
        for lms, colour in ((truth, (0, 200, 0)), (pred, (255, 60, 60))):
            if lms is not None:
                _draw_vertebrae(draw, _on_canvas(lms, scale), colour)
    if cobb is not None and (pred is not None or truth is not None):
        _draw_main_curve(draw, _on_canvas(pred if pred is not None else truth, scale), cobb, canvas.width)
    if label:
        draw.text((3, 3), label, fill=(255, 255, 0))
    return canvas


def _on_canvas(landmarks: torch.Tensor, scale: int) -> torch.Tensor:
    """(L, 2) landmark pixels to canvas pixels of an image enlarged ``scale`` times (NaN kept)."""
    return landmarks.detach().double().cpu() * scale + (scale - 1) / 2


def _draw_vertebrae(draw, points: torch.Tensor, colour) -> None:
    """Each vertebra's outline TL -> TR -> BR -> BL; vertebrae with a missing corner are skipped."""
    for corners in points[: len(points) // 4 * 4].reshape(-1, 4, 2):
        if bool(torch.isfinite(corners).all()):
            tl, tr, bl, br = (tuple(c) for c in corners.tolist())
            draw.line([tl, tr, br, bl, tl], fill=colour, width=1)


def _draw_main_curve(draw, points: torch.Tensor, cobb: tuple, width: int) -> None:
    """The two vertebrae's mid-lines (left-side mid-point to right-side mid-point), extended to twice
    their length, and the angle at the right end of the upper one (kept inside the canvas ``width``)."""
    upper, lower, degrees = cobb
    corners = points[: len(points) // 4 * 4].reshape(-1, 4, 2)
    ends = []
    for v in (upper, lower):
        left, right = (corners[v, 0] + corners[v, 2]) / 2, (corners[v, 1] + corners[v, 3]) / 2
        centre, half = (left + right) / 2, right - left
        ends.append((tuple((centre - half).tolist()), tuple((centre + half).tolist())))
    if not all(v == v for end in ends for point in end for v in point):
        return
    for start, stop in ends:
        draw.line([start, stop], fill=(0, 220, 255), width=2)
    x, y = ends[0][1]
    text = f"{float(degrees):.1f} deg"
    draw.text((max(0.0, min(x + 3, width - draw.textlength(text) - 2)), max(0.0, y - 12)), text, fill=(0, 220, 255))


def save_overlay(path, image: torch.Tensor, truth: Optional[torch.Tensor] = None,
                 pred: Optional[torch.Tensor] = None, label: Optional[str] = None, scale: int = 1,
                 radii: Optional[torch.Tensor] = None, *, vertebrae: bool = False,
                 cobb: Optional[tuple] = None) -> Path:
    """PNG file of :func:`render_overlay`."""
    return atomic_write_bytes(path, _png_bytes(render_overlay(image, truth, pred, label, scale, radii,
                                                              vertebrae=vertebrae, cobb=cobb)))


def _png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
