"""Random geometric and intensity augmentation that moves the landmarks exactly (shared by every dataset)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ._common import normalize, seed_for

__all__ = ["augment_sample", "warp_affine"]

def _affine_matrix(angle_deg: float, scale: float, shift: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """3x3 pixel-space matrix mapping input pixels to output pixels (rotation + scale about the centre)."""
    h, w = size
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    a = math.radians(angle_deg)
    c, s = math.cos(a) * scale, math.sin(a) * scale
    return torch.tensor(
        [[c, -s, cx - c * cx + s * cy + shift[0]], [s, c, cy - s * cx - c * cy + shift[1]], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )


def warp_affine(image: torch.Tensor, landmarks: torch.Tensor, matrix: torch.Tensor):
    """Warp ``image`` (C, H, W) by the input->output pixel ``matrix``; landmarks follow exactly."""
    _, h, w = image.shape
    inverse = torch.linalg.inv(matrix)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    src = torch.stack((xs, ys, torch.ones_like(xs)), -1) @ inverse.T  # output pixel -> input pixel
    grid = torch.stack(((2 * src[..., 0] + 1) / w - 1, (2 * src[..., 1] + 1) / h - 1), -1)
    # Fill with the border value of the normalized image rather than 0 (= the mean).
    warped = F.grid_sample(image[None], grid[None].to(image.dtype), mode="bilinear", padding_mode="border",
                           align_corners=False)[0]
    homog = torch.cat((landmarks.double(), torch.ones(landmarks.shape[0], 1, dtype=torch.float64)), 1)
    moved = (homog @ matrix.T)[:, :2].to(landmarks.dtype)
    return warped, moved


def augment_sample(
    image: torch.Tensor,
    landmarks: torch.Tensor,
    generator: torch.Generator,
    rotation: float = 10.0,
    scale: float = 0.1,
    translation: float = 0.05,
    intensity: float = 0.2,
):
    """Random rotation (deg), isotropic scale, translation (fraction of size) and intensity jitter.

    The landmarks are mapped through the same affine matrix, so they stay exact.
    """

    def uniform(low, high):
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    _, h, w = image.shape
    matrix = _affine_matrix(
        uniform(-rotation, rotation),
        uniform(1 - scale, 1 + scale),
        (uniform(-translation, translation) * w, uniform(-translation, translation) * h),
        (h, w),
    )
    image, landmarks = warp_affine(image, landmarks, matrix)
    if intensity > 0:
        gamma = uniform(1 - intensity, 1 + intensity)
        lo, hi = image.amin(), image.amax()
        unit = ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) ** gamma
        image = unit * uniform(1 - intensity, 1 + intensity) + uniform(-intensity, intensity)
    return normalize(image), landmarks


class _Augmenting(Dataset):
    """Applies :func:`augment_sample` with a generator seeded by ``(seed, epoch, index)``.

    Seeding per sample and epoch (``set_epoch``) makes augmentation independent of the
    worker layout and of interruptions, so a resumed run sees the same samples.
    """

    def __init__(self, augment: bool | dict, seed: int) -> None:
        self.augment = dict(augment) if isinstance(augment, dict) else ({} if augment else None)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _maybe_augment(self, index: int, item: dict) -> dict:
        if self.augment is None:
            return item
        gen = torch.Generator().manual_seed(seed_for("augment", self.seed, self.epoch, index))
        item["image"], item["landmarks"] = augment_sample(item["image"], item["landmarks"], gen, **self.augment)
        return item

