"""Overlay images: predicted (red) vs true (green) landmarks drawn on a radiograph.

Used for the run folder's ``overlays/*.png``, ``evaluate``'s and ``predict``'s PNGs and
the TensorBoard validation images, so every place shows landmarks and uncertainty
circles the same way.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from .files import atomic_write_bytes

__all__ = ["render_overlay", "save_overlay"]


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
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
