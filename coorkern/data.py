"""Landmark datasets: a built-in synthetic radiograph generator and the public formats.

One entry point, :func:`load_dataset`, returns a ``torch.utils.data.Dataset`` whose
items are dicts::

    image      float32 (1, H, W), per-image normalized (zero mean, unit std)
    landmarks  float32 (L, 2), (x, y) in the resized image's pixels (pixel centres
               at integer coordinates, the convention of the central loss); NaN = missing
    spacing    float32 (2,), mm per resized pixel in x and y, NaN where unknown
    id         str

Datasets (``name``):

* ``synthetic`` (default; nothing downloaded or shipped) -- procedurally generated
  grey-level "cephalograms": a skull ring, a facial profile, a jaw, a row of identical
  teeth, a column of identical vertebrae and several identical small rings, under a
  random pose, scale and smooth non-rigid deformation, with shape variation, bone
  texture, intensity inhomogeneity, blur and noise.  Many landmarks sit on one of a
  set of locally identical structures (the 2nd of 8 teeth, a corner of the 4th of 5
  vertebrae, the centre of one of five rings), so local appearance alone cannot name
  them.  Every image is a pure function of ``(seed, split, index)``.
* ``isbi2015`` -- ISBI 2015 cephalometric challenge layout (0.1 mm/pixel, mean of
  the senior and junior annotations); ``protocol="paper"`` (150 train / 250 test) or
  ``"challenge"`` (150 train / 150 test1 / 100 test2).
* ``hand`` -- Digital Hand Atlas with Payer's ``all.csv``; spacing from the wrist width
  (50 mm between the two wrist landmarks, ``wrist_indices``).
* ``chest`` -- Shenzhen chest X-rays with six landmarks given as fractions of the
  image size; spacing unknown (metrics in pixels).
* ``csv`` -- generic CSV or JSON: ``image_path, x0, y0, ...`` plus optional
  ``spacing`` (or ``spacing_x, spacing_y``) and ``split`` columns.

Errors in annotations or images name the file and, for text formats, the line.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_THRESHOLDS",
    "DatasetFormatError",
    "LandmarkDataset",
    "SyntheticLandmarks",
    "load_dataset",
    "read_image",
    "augment_sample",
    "render_synthetic",
]

DATASETS = ("synthetic", "isbi2015", "hand", "chest", "csv")
# The paper's training sizes (H, W); synthetic: the quick-run default.
DEFAULT_IMAGE_SIZE = {
    "synthetic": (256, 256),
    "isbi2015": (512, 416),
    "hand": (512, 384),
    "chest": (512, 512),
    "csv": (512, 512),
}
# SDR radii per dataset (mm, or px where the spacing is unknown).
DEFAULT_THRESHOLDS = {
    "synthetic": (2.0, 2.5, 3.0, 4.0),
    "isbi2015": (2.0, 2.5, 3.0, 4.0),
    "hand": (2.0, 4.0, 10.0),
    "chest": (3.0, 6.0, 9.0),
    "csv": (2.0, 2.5, 3.0, 4.0),
}
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DatasetFormatError(ValueError):
    """A dataset file is missing, unreadable or not in the expected format."""


def _where(path, line: Optional[int] = None) -> str:
    return f"{path}, line {line}" if line is not None else str(path)


def _fail(path, line: Optional[int], message: str) -> DatasetFormatError:
    return DatasetFormatError(f"{_where(path, line)}: {message}")


def _parse_float(text: str, path, line: int) -> float:
    text = text.strip()
    if text.lower() in ("", "nan"):
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise _fail(path, line, f"expected a number, got {text!r}") from None


def _check_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise TypeError(f"image_size must be an int or (H, W), got {image_size!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"image_size must be at least 8x8, got {(h, w)}")
    return h, w


def _normalize(image: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per image (over all but the leading dims)."""
    flat = image.flatten(-2)
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, keepdim=True).clamp_min(1e-6)
    return ((flat - mean) / std).view_as(image)


@contextlib.contextmanager
def single_thread():
    """Run many small tensor ops on one thread (restored afterwards).

    Rendering is thousands of small element-wise ops; on a 2-core machine shared with
    other work, a second intra-op thread made it ~40x slower (62 vs 1.5 ms per 64x64 image).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _seed_for(*parts) -> int:
    """A 63-bit seed from any hashable description (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------
# Augmentation (shared by every dataset)


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
    return _normalize(image), landmarks


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
        gen = torch.Generator().manual_seed(_seed_for("augment", self.seed, self.epoch, index))
        item["image"], item["landmarks"] = augment_sample(item["image"], item["landmarks"], gen, **self.augment)
        return item


# ---------------------------------------------------------------------------
# Synthetic radiographs

# Canonical template in [-1, 1]^2 (x right, y down): a head in profile facing right.
_SKULL = dict(center=(-0.05, -0.22), radii=(0.62, 0.50), thickness=0.05)
# Five identical small rings: sella, porion, orbit and two distractors.
_RINGS = [(-0.30, -0.10), (0.02, 0.02), (0.36, -0.08), (-0.42, 0.22), (0.10, -0.35)]
_RING_RADIUS = 0.055
_FACE = [(0.52, -0.28), (0.70, -0.08), (0.62, 0.05), (0.66, 0.16), (0.62, 0.30), (0.58, 0.48), (0.40, 0.60)]
_JAW = [(0.40, 0.60), (-0.02, 0.48), (-0.06, 0.14)]
_TEETH = ((0.16, 0.30), (0.50, 0.22), 8)  # from, to, count
_VERTEBRAE = ((-0.30, 0.40), (-0.36, 0.86), 5)
NUM_SYNTHETIC_LANDMARKS = 19
NUM_CLUTTER = 3


def _template_landmarks() -> torch.Tensor:
    """19 template landmarks (canonical coords) -- also the layout of the shape modes."""
    sk_c, sk_r = _SKULL["center"], _SKULL["radii"]
    pts = [
        (sk_c[0] + sk_r[0] * math.cos(a), sk_c[1] + sk_r[1] * math.sin(a))
        for a in (-math.pi / 2, -math.pi / 5, math.pi * 0.85)  # vertex, frontal, occipital on the skull ring
    ]
    pts += _FACE[:6] + [_JAW[1], _JAW[2]]  # 6 profile points, gonion, condylion
    pts += [_RINGS[0], _RINGS[1], (_RINGS[2][0], _RINGS[2][1] + _RING_RADIUS)]  # sella, porion, orbitale
    pts += [(0.0, 0.0)] * 5  # placeholders: 2 teeth tips, 2 vertebra corners, menton (filled by the scene)
    return torch.tensor(pts, dtype=torch.float64)


@dataclass
class _SceneParams:
    """Per-image random draws (all float64 tensors with a leading batch dim)."""

    shape: torch.Tensor  # (B, 4) shape-mode coefficients
    pose: torch.Tensor  # (B, 5) angle, log-scale x, log-scale y, shift x, shift y
    warp_amp: torch.Tensor  # (B, K, 2)
    warp_freq: torch.Tensor  # (B, K, 2)
    warp_phase: torch.Tensor  # (B, K)
    tex: torch.Tensor  # (B, 1, 16, 16) bone texture in canonical space
    bias: torch.Tensor  # (B, 1, 4, 4) intensity inhomogeneity in image space
    look: torch.Tensor  # (B, 6) intensities / blur / noise
    noise_seed: torch.Tensor  # (B,) int64
    clutter: torch.Tensor  # (B, C, 6) random bars


def _draw_params(seeds: Sequence[int], difficulty: float) -> _SceneParams:
    fields: dict[str, list] = {k: [] for k in _SceneParams.__dataclass_fields__}
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))

        def r(*shape):
            return torch.rand(*shape, generator=g, dtype=torch.float64)

        def n(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        d = difficulty
        fields["shape"].append(n(4))
        fields["pose"].append(torch.cat((n(1) * 0.20 * d, n(2) * 0.08 * d, n(2) * 0.07 * d)))  # ~11 deg, ~8%
        k = 4
        freq = (0.6 + r(k, 1) * 1.6) * math.pi
        ang = r(k, 1) * 2 * math.pi
        fields["warp_freq"].append(torch.cat((freq * torch.cos(ang), freq * torch.sin(ang)), 1))
        fields["warp_amp"].append(n(k, 2) * 0.012 * d)
        fields["warp_phase"].append(r(k) * 2 * math.pi)
        fields["tex"].append(n(1, 16, 16))
        fields["bias"].append(n(1, 4, 4))
        fields["look"].append(r(6))
        fields["noise_seed"].append(torch.randint(0, 2**62, (), generator=g))
        fields["clutter"].append(r(NUM_CLUTTER, 6))
    return _SceneParams(**{k: torch.stack(v) for k, v in fields.items()})


def _shape_modes() -> torch.Tensor:
    """4 smooth, fixed shape modes (19, 2): face length, jaw angle, skull aspect, head tilt."""
    t = _template_landmarks()
    y = t[:, 1:2]
    x = t[:, 0:1]
    modes = torch.stack(
        [
            torch.cat((torch.zeros_like(y), 0.06 * (y + 0.2).clamp_min(0)), 1),  # longer lower face
            torch.cat((0.05 * (y + 0.1).clamp_min(0), torch.zeros_like(y)), 1),  # prognathism
            torch.cat((0.04 * x, -0.03 * y), 1),  # skull aspect
            torch.cat((-0.03 * y, 0.03 * x), 1) * (x > 0.3),  # face rotation
        ]
    )
    return modes  # (4, 19, 2)


def _deform(p: torch.Tensor, params: _SceneParams) -> torch.Tensor:
    """Smooth displacement field d(p) (normalized image coords), (B, N, 2) -> (B, N, 2)."""
    phase = torch.einsum("bnc,bkc->bnk", p, params.warp_freq) + params.warp_phase[:, None, :]
    return torch.einsum("bnk,bkc->bnc", torch.sin(phase), params.warp_amp)


def _pose_matrix(params: _SceneParams):
    angle, sx, sy, tx, ty = params.pose.unbind(1)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)  # (B, 2, 2)
    scale = torch.diag_embed(torch.stack((torch.exp(sx), torch.exp(sy)), -1))
    return rot @ scale, torch.stack((tx, ty), -1)


def _image_to_canonical(p, params):
    """u = A (p + d(p)) + t: where image point p (normalized coords) reads the canonical scene."""
    a, t = _pose_matrix(params)
    return (p + _deform(p, params)) @ a.transpose(1, 2) + t[:, None, :]


def _canonical_to_image(u, params, iterations: int = 40):
    """Inverse of :func:`_image_to_canonical` by fixed-point iteration (the warp is a contraction)."""
    a, t = _pose_matrix(params)
    base = (u - t[:, None, :]) @ torch.linalg.inv(a).transpose(1, 2)
    p = base.clone()
    for _ in range(iterations):
        p = base - _deform(p, params)
    return p


def _ramp(x: torch.Tensor, edge: float = 0.008) -> torch.Tensor:
    """Soft step 0 -> 1 across ``x`` in ``[-edge, edge]`` (cheaper than a sigmoid, same look after blur)."""
    return x.mul_(0.5 / edge).add_(0.5).clamp_(0.0, 1.0)


def _ellipse_distance(ux, uy, center, radii):
    """Approximate signed distance to ellipse outlines (negative inside), ``(B, N, E)``.

    ux, uy (B, N, 1) canonical coordinates; center, radii (B, E, 2).
    """
    qx = (ux - center[:, None, :, 0]) / radii[:, None, :, 0]
    qy = (uy - center[:, None, :, 1]) / radii[:, None, :, 1]
    return (qx * qx).add_(qy * qy).sqrt_().sub_(1.0).mul_(radii.min(-1).values[:, None, :])


def _occupancy(ux, uy, center, radii, thickness, value):
    """Summed soft occupancy of ellipses: ``thickness`` 0 filled, else a ring of that width."""
    rings = thickness > 0
    total = 0
    for mask, solid in ((rings, False), (~rings, True)):
        if bool(mask.any()):
            dist = _ellipse_distance(ux, uy, center[:, mask], radii[:, mask])
            occ = _ramp(dist.neg_()) if solid else _ramp(dist.abs_().neg_().add_(thickness[mask] / 2))
            total = total + occ.mul_(value[mask]).sum(-1)
    return total


def _capsule_field(ux, uy, a, b, width, value):
    """Summed soft occupancy of thick segments a-b; ux, uy (B, N, 1); a, b (B, S, 2); width, value (B, S)."""
    width, value = width[:, None, :], value[:, None, :]
    abx, aby = (b[..., 0] - a[..., 0])[:, None], (b[..., 1] - a[..., 1])[:, None]
    apx, apy = ux - a[:, None, :, 0], uy - a[:, None, :, 1]
    h = ((apx * abx).add_(apy * aby)).div_((abx * abx + aby * aby).clamp_min(1e-12)).clamp_(0, 1)
    dx, dy = apx.sub_(h * abx), apy.sub_(h * aby)
    dist = (dx * dx).add_(dy * dy).sqrt_()
    return _ramp(dist.neg_().add_(width / 2)).mul_(value).sum(-1)


def _scene(params: _SceneParams):
    """Landmarks (B, 19, 2) and primitives, all in canonical coordinates."""
    batch = params.shape.shape[0]
    disp = torch.einsum("bm,mlc->blc", params.shape * 0.8, _shape_modes())  # (B, 19, 2)
    tmpl = _template_landmarks()

    def point(xy, ref):  # a scene point moves with landmark ``ref``'s shape displacement
        return torch.tensor(xy, dtype=torch.float64)[None] + disp[:, ref]

    skull_c = point(_SKULL["center"], 0)
    skull_r = torch.tensor(_SKULL["radii"], dtype=torch.float64)[None] * (1 + 0.04 * params.shape[:, 2:3])
    face = torch.stack([point(xy, 3 + i if i < 6 else 8) for i, xy in enumerate(_FACE)], 1)
    jaw = torch.stack([face[:, 6], point(_JAW[1], 9), point(_JAW[2], 10)], 1)
    rings = torch.stack([point(xy, ref) for xy, ref in zip(_RINGS, (11, 12, 13, 11, 12))], 1)
    t_from, t_to, t_n = _TEETH
    w = torch.linspace(0, 1, t_n, dtype=torch.float64)[None, :, None]
    tooth_from, tooth_to = point(t_from, 9), point(t_to, 7)
    teeth = tooth_from[:, None] + w * (tooth_to - tooth_from)[:, None]
    teeth = teeth + torch.stack((torch.zeros_like(w[..., 0]), -0.05 * torch.sin(math.pi * w[..., 0])), -1)  # arch
    v_from, v_to, v_n = _VERTEBRAE
    w = torch.linspace(0, 1, v_n, dtype=torch.float64)[None, :, None]
    vert_from, vert_to = point(v_from, 10), point(v_to, 10)
    vertebrae = vert_from[:, None] + w * (vert_to - vert_from)[:, None]

    angles = torch.tensor([-math.pi / 2, -math.pi / 5, math.pi * 0.85], dtype=torch.float64)
    lms = [skull_c[:, None] + skull_r[:, None] * torch.stack((torch.cos(angles), torch.sin(angles)), -1)[None]]
    lms.append(face[:, :6])
    lms.append(jaw[:, 1:3])
    lms.append(rings[:, 0:2])
    lms.append(rings[:, 2:3] + torch.tensor([0.0, _RING_RADIUS], dtype=torch.float64))
    tooth_half = torch.tensor([0.0, 0.042], dtype=torch.float64)
    lms.append(torch.stack((teeth[:, 1] + tooth_half, teeth[:, 5] + tooth_half), 1))  # tooth tips (2nd, 6th)
    vert_half = torch.tensor([0.07, 0.0], dtype=torch.float64)
    lms.append(torch.stack((vertebrae[:, 1] + vert_half, vertebrae[:, 3] + vert_half), 1))  # right ends (2nd, 4th)
    lms.append(face[:, 6:7])  # menton
    landmarks = torch.cat(lms, 1)
    assert landmarks.shape == (batch, NUM_SYNTHETIC_LANDMARKS, 2) and tmpl.shape[0] == NUM_SYNTHETIC_LANDMARKS

    ones = torch.ones(batch, 1, 2, dtype=torch.float64)
    ellipses = (
        torch.cat((skull_c[:, None], rings, teeth, vertebrae), 1),
        torch.cat((skull_r[:, None], ones.expand(-1, len(_RINGS), -1) * _RING_RADIUS,
                   ones.expand(-1, t_n, -1) * torch.tensor([0.014, 0.042], dtype=torch.float64),
                   ones.expand(-1, v_n, -1) * torch.tensor([0.07, 0.035], dtype=torch.float64)), 1),
        torch.tensor([_SKULL["thickness"]] + [0.018] * len(_RINGS) + [0.0] * (t_n + v_n), dtype=torch.float64),
        torch.tensor([1.0] + [0.9] * len(_RINGS) + [1.3] * t_n + [1.0] * v_n, dtype=torch.float64),
    )
    segs = torch.cat((face, jaw), 1)
    # Clutter: random bright bars (overlapping anatomy, positioning devices) anywhere in the head.
    c = params.clutter  # (B, C, 6): start x, y in [0, 1), angle, length, width, value
    start = c[..., 0:2] * 1.6 - 0.8
    angle = c[..., 2] * 2 * math.pi
    end = start + (0.15 + 0.35 * c[..., 3:4]) * torch.stack((torch.cos(angle), torch.sin(angle)), -1)
    capsules = (
        torch.cat((segs[:, 0:6], segs[:, 7:9], start), 1),
        torch.cat((segs[:, 1:7], segs[:, 8:10], end), 1),
        torch.cat((torch.tensor([0.02] * 6 + [0.06] * 2, dtype=torch.float64).expand(batch, -1),
                   0.01 + 0.03 * c[..., 4]), 1),
        torch.cat((torch.tensor([0.5] * 6 + [0.9] * 2, dtype=torch.float64).expand(batch, -1),
                   0.2 + 0.4 * c[..., 5]), 1),
    )
    return landmarks, ellipses, capsules


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur; images (B, 1, H, W), sigma (B,) in pixels."""
    radius = 4
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, K)
    b = images.shape[0]
    out = F.pad(images.transpose(0, 1), (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, k[:, None, None, :], groups=b)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b)
    return out.transpose(0, 1)


def render_synthetic(
    seeds: Sequence[int],
    image_size: tuple[int, int] = (256, 256),
    difficulty: float = 1.0,
    scene_fn=None,
):
    """Render synthetic radiographs for a list of per-image seeds (vectorized over the batch).

    Returns ``(images (B, 1, H, W) float32 in ~[0, 1], landmarks (B, 19, 2) float32 pixels)``.
    ``scene_fn(u, landmarks_canonical) -> (B, C, N)`` (``u``: ``(B, N, 2)`` canonical
    coordinates of the pixels) replaces the anatomy, returning ``(B, C, H, W)`` maps as the
    images; the tests draw dots at the canonical landmarks and check that they land on the
    reported landmarks.
    """
    h, w = _check_size(image_size)
    params = _draw_params(seeds, float(difficulty))
    batch = len(seeds)
    landmarks_c, ellipses, capsules = _scene(params)

    # Normalized image coordinates of the pixel centres: x_n in [-1, 1] across the width.
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    half = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=torch.float64)
    pix = torch.stack((xs, ys), -1).reshape(1, h * w, 2)
    p = (pix - half) / half
    # The image grid in float32 (the warp is smooth; float32 is ~1e-5 px), the landmarks in float64.
    params32 = _SceneParams(**{k: v.float() if v.is_floating_point() else v for k, v in vars(params).items()})
    u = _image_to_canonical(p.float().expand(batch, -1, -1), params32)  # (B, N, 2)
    landmarks = _canonical_to_image(landmarks_c, params) * half + half

    if scene_fn is not None:
        density = scene_fn(u.double(), landmarks_c)
        return density.reshape(batch, -1, h, w).float(), landmarks.float()

    look = params.look
    u32 = u.float()
    ellipses = [t.float() for t in ellipses]
    capsules = [t.float() for t in capsules]
    # A few images (~32k pixels) at a time: the (pixels x primitives) temporaries then stay in
    # cache (~3-5x faster than the whole batch at once).
    bone = torch.empty(batch, h * w)
    group = max(1, 32768 // (h * w))
    for i in range(0, batch, group):
        j = slice(i, i + group)
        ux, uy = u32[j, :, 0:1], u32[j, :, 1:2]
        occ = _occupancy(ux, uy, ellipses[0][j], ellipses[1][j], *ellipses[2:])
        bone[j] = occ + _capsule_field(ux, uy, *(t[j] for t in capsules))
    # Soft tissue: a blurry head silhouette.
    head = torch.sigmoid((1.0 - (((u32 - torch.tensor([0.05, 0.0])) / torch.tensor([0.8, 0.95])) ** 2).sum(-1)) / 0.08)
    # Bone texture lives in canonical space (it moves with the anatomy).
    tex = F.grid_sample(params.tex.float(), u32[:, :, None, :], mode="bicubic", align_corners=True)[:, 0, :, 0]
    density = 0.35 * head + bone * (0.75 + 0.25 * tex * (0.5 + look[:, 0:1].float()))
    density = density.reshape(batch, 1, h, w)
    # Intensity inhomogeneity (image space), blur, noise.
    bias = F.interpolate(params.bias.float(), size=(h, w), mode="bicubic", align_corners=True)
    density = density * (1.0 + 0.25 * bias * (0.5 + look[:, 1, None, None, None].float()))
    density = density + 0.15 * (0.5 + look[:, 2, None, None, None].float()) * bias.flip(-1)
    sigma_px = (0.4 + 1.2 * look[:, 3]).float() * (max(h, w) / 256.0)
    density = _gaussian_blur(density, sigma_px)
    noise = torch.empty_like(density)
    for i in range(batch):
        g = torch.Generator().manual_seed(int(params.noise_seed[i]))
        noise[i].normal_(generator=g)
    density = density.clamp_min(0) + noise * (0.03 + 0.07 * look[:, 4, None, None, None].float())
    images = 1.0 - torch.exp(-density)  # film response: a radiograph-like grey scale
    return images.float(), landmarks.float()


class SyntheticLandmarks(_Augmenting):
    """Procedural radiographs with 19 landmarks (see the module docstring).

    Item ``i`` of split ``s`` is a pure function of ``(seed, s, i, image_size,
    difficulty)``.  With ``cache=True`` (default) images are rendered once, in
    vectorized chunks, on first access.  Spacing: the canonical field of view is
    ``field_of_view_mm`` wide (default 102.4 mm, i.e. 0.4 mm/pixel at 256 px).
    """

    SPLIT_SIZES = {"train": 800, "val": 100, "test": 200}

    def __init__(
        self,
        split: str = "train",
        image_size=(256, 256),
        seed: int = 0,
        num_samples: Optional[int] = None,
        difficulty: float = 1.0,
        augment: bool | dict = False,
        cache: bool = True,
        field_of_view_mm: float = 102.4,
        chunk: int = 64,
    ) -> None:
        super().__init__(augment, seed)
        if split not in self.SPLIT_SIZES:
            raise ValueError(f"synthetic split must be one of {tuple(self.SPLIT_SIZES)}, got {split!r}")
        self.split = split
        self.image_size = _check_size(image_size)
        self.num_samples = self.SPLIT_SIZES[split] if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.difficulty = float(difficulty)
        self.cache = cache
        self.chunk = int(chunk)
        h, w = self.image_size
        self.spacing = torch.tensor([field_of_view_mm / w, field_of_view_mm / h], dtype=torch.float32)
        self.num_landmarks = NUM_SYNTHETIC_LANDMARKS
        self.thresholds = DEFAULT_THRESHOLDS["synthetic"]
        self._images: Optional[torch.Tensor] = None
        self._landmarks: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.num_samples

    def _seeds(self, indices) -> list[int]:
        return [_seed_for("synthetic", self.seed, self.split, int(i)) for i in indices]

    def _render(self, indices):
        with single_thread():
            images, landmarks = render_synthetic(self._seeds(indices), self.image_size, self.difficulty)
        return _normalize(images), landmarks

    def _fill_cache(self) -> None:
        images, landmarks = [], []
        for start in range(0, self.num_samples, self.chunk):
            im, lm = self._render(range(start, min(start + self.chunk, self.num_samples)))
            images.append(im)
            landmarks.append(lm)
        self._images, self._landmarks = torch.cat(images), torch.cat(landmarks)

    def all_landmarks(self) -> torch.Tensor:
        """(N, 19, 2) landmarks of every item without augmentation."""
        if self.cache:
            if self._landmarks is None:
                self._fill_cache()
            return self._landmarks.clone()
        return torch.cat([self._render([i])[1] for i in range(self.num_samples)])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        if self.cache:
            if self._images is None:
                self._fill_cache()
            image, landmarks = self._images[index].clone(), self._landmarks[index].clone()
        else:
            image, landmarks = (t[0] for t in self._render([index]))
        item = {"image": image, "landmarks": landmarks, "spacing": self.spacing.clone(),
                "id": f"{self.split}_{index:05d}"}
        return self._maybe_augment(index, item)


# ---------------------------------------------------------------------------
# Files on disk


def read_image(path) -> torch.Tensor:
    """Read a BMP/PNG/JPEG/TIFF with Pillow as float32 grey ``(1, H, W)`` in [0, 1]."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise ImportError("reading images needs Pillow: pip install Pillow") from exc
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float32)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(array.max()), 1.0)
                array = array / top
            elif img.mode == "F":
                array = np.asarray(img, dtype=np.float32)
            else:
                array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: cannot read image ({exc})") from exc
    if array.ndim != 2:
        raise DatasetFormatError(f"{path}: expected a grey or colour image, got array shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array))[None]


def image_size_of(path) -> tuple[int, int]:
    """(H, W) of an image file from its header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: image file not found") from None
    except Exception as exc:
        raise DatasetFormatError(f"{path}: cannot read image ({exc})") from exc
    return h, w


@dataclass
class Record:
    """One annotated image: landmarks in original pixels; spacing in mm per original pixel."""

    id: str
    image_path: Path
    landmarks: np.ndarray  # (L, 2); may be fractions of the size when ``relative``
    spacing: tuple[float, float] = (float("nan"), float("nan"))
    source: str = ""  # where the annotation came from, for error messages
    relative: bool = False  # landmarks are fractions of (W, H)


class LandmarkDataset(_Augmenting):
    """Images from disk resized to ``image_size`` with landmarks and spacing scaled accordingly."""

    def __init__(
        self,
        records: Sequence[Record],
        image_size=(512, 512),
        augment: bool | dict = False,
        seed: int = 0,
        thresholds: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
        name: str = "csv",
        cache: bool = False,
    ) -> None:
        super().__init__(augment, seed)
        self.cache = {} if cache else None  # index -> resized item (decoding large PNGs every epoch is slow)
        if not records:
            raise DatasetFormatError(f"{name}: no annotated images found for this split")
        counts = {r.landmarks.shape[0] for r in records}
        if len(counts) != 1:
            raise DatasetFormatError(f"{name}: images have different numbers of landmarks: {sorted(counts)}")
        self.records = list(records)
        self.image_size = _check_size(image_size)
        self.num_landmarks = counts.pop()
        self.thresholds = tuple(thresholds)
        self.name = name
        for r in self.records:
            if not r.image_path.is_file():
                raise DatasetFormatError(f"{r.image_path}: image file not found (annotated in {r.source})")

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict:
        """The resized, normalized item without augmentation."""
        if self.cache is not None and index in self.cache:
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.cache[index].items()}
        item = self._read(index)
        if self.cache is not None:
            self.cache[index] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        return item

    def _read(self, index: int) -> dict:
        rec = self.records[index]
        image = read_image(rec.image_path)
        oh, ow = image.shape[-2:]
        h, w = self.image_size
        lm = torch.as_tensor(rec.landmarks, dtype=torch.float64)
        if rec.relative:
            lm = lm * torch.tensor([ow, oh], dtype=torch.float64)
        spacing = torch.tensor(rec.spacing, dtype=torch.float64)
        sx, sy = ow / w, oh / h  # original pixels per resized pixel
        if (oh, ow) != (h, w):
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        # Pixel centres at integers: x_new + 0.5 = (x_old + 0.5) * w / ow.
        lm = (lm + 0.5) / torch.tensor([sx, sy], dtype=torch.float64) - 0.5
        spacing = spacing * torch.tensor([sx, sy], dtype=torch.float64)
        return {"image": _normalize(image), "landmarks": lm.float(), "spacing": spacing.float(), "id": rec.id}

    def __getitem__(self, index: int) -> dict:
        return self._maybe_augment(index, self.load(index))

    def all_landmarks(self) -> torch.Tensor:
        """(N, L, 2) landmarks in resized pixels (reads each image's header for its size)."""
        out = []
        h, w = self.image_size
        for rec in self.records:
            oh, ow = image_size_of(rec.image_path)
            lm = torch.as_tensor(rec.landmarks, dtype=torch.float64)
            if rec.relative:
                lm = lm * torch.tensor([ow, oh], dtype=torch.float64)
            out.append(((lm + 0.5) * torch.tensor([w / ow, h / oh], dtype=torch.float64) - 0.5).float())
        return torch.stack(out)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: annotation file not found")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read annotation file ({exc})") from exc


def _parse_points(lines: Sequence[str], path: Path, count: int, first_line: int = 1, sep=",") -> np.ndarray:
    """``count`` lines of ``x<sep>y`` starting at (1-based) ``first_line``."""
    points = []
    for k in range(count):
        line_no = first_line + k
        if line_no > len(lines):
            raise _fail(path, line_no, f"expected {count} landmark lines, the file ends after line {len(lines)}")
        parts = lines[line_no - 1].replace(sep, " ").split()
        if len(parts) != 2:
            raise _fail(path, line_no, f"expected 'x{sep}y', got {lines[line_no - 1]!r}")
        points.append([_parse_float(p, path, line_no) for p in parts])
    return np.asarray(points, dtype=np.float64)


def _index_images(folder: Path, pattern: str = "*") -> dict[str, Path]:
    found = {}
    if folder.is_dir():
        for p in sorted(folder.rglob(pattern)):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                found.setdefault(p.stem, p)
    return found


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetFormatError(f"{path}: {what} folder not found")
    return path


ISBI_SPLITS = {
    "paper": {"train": range(1, 151), "test": range(151, 401)},
    "challenge": {"train": range(1, 151), "test1": range(151, 301), "test2": range(301, 401)},
}


def isbi2015_records(root, split="train", protocol="paper", annotator="mean", num_landmarks=19, ids=None):
    """Records of the ISBI 2015 cephalometric data (``RawImage/**/NNN.bmp``, ``AnnotationsByMD/400_*/NNN.txt``)."""
    root = Path(root)
    if protocol not in ISBI_SPLITS:
        raise ValueError(f"protocol must be one of {tuple(ISBI_SPLITS)}, got {protocol!r}")
    if split not in ISBI_SPLITS[protocol]:
        raise ValueError(f"isbi2015 split for protocol {protocol!r} must be one of {tuple(ISBI_SPLITS[protocol])}")
    if annotator not in ("mean", "senior", "junior"):
        raise ValueError(f"annotator must be 'mean', 'senior' or 'junior', got {annotator!r}")
    image_dir = root / "RawImage" if (root / "RawImage").is_dir() else root
    images = _index_images(image_dir, "*.bmp")
    ann_dir = _require_dir(root / "AnnotationsByMD", "annotation (AnnotationsByMD)")
    wanted = list(ids) if ids is not None else list(ISBI_SPLITS[protocol][split])
    # A partial copy of the data set is fine (ids with neither image nor annotation are not
    # part of it); an id with only one of the two is an error, never skipped.
    present = {int(stem) for stem in images if stem.isdigit()}
    present |= {int(p.stem) for p in ann_dir.glob("400_*/*.txt") if p.stem.isdigit()}
    records = []
    for number in wanted:
        if ids is None and number not in present:
            continue
        stem = f"{number:03d}"
        who = ("senior", "junior") if annotator == "mean" else (annotator,)
        points = [
            _parse_points(_read_lines(ann_dir / f"400_{w}" / f"{stem}.txt"), ann_dir / f"400_{w}" / f"{stem}.txt",
                          num_landmarks)
            for w in who
        ]
        path = images.get(stem, image_dir / f"{stem}.bmp")
        source = str(ann_dir / f"400_{who[0]}" / f"{stem}.txt")
        records.append(Record(stem, path, np.mean(points, axis=0), (0.1, 0.1), source=source))
    return records


def _fraction_split(items: list, split: str, train_fraction: float, name: str) -> list:
    if split == "all":
        return items
    cut = int(round(len(items) * train_fraction))
    if split == "train":
        return items[:cut]
    if split in ("test", "val"):
        return items[cut:]
    raise ValueError(f"{name} split must be 'train', 'test' ('val') or 'all', got {split!r}")


def hand_records(root, split="train", train_fraction=609 / 909, wrist_indices=(1, 5), wrist_mm=50.0,
                 landmark_indices=None, csv_name="all.csv"):
    """Digital Hand Atlas: ``all.csv`` (``image_id,x0,y0,...``, no header) + ``image_id.jpg``.

    The physical scale is set per image by ``wrist_mm`` between the landmarks
    ``wrist_indices`` (indices into the csv's landmarks, before ``landmark_indices``).
    """
    root = Path(root)
    table = root / csv_name
    if not table.is_file():
        table = next(iter(sorted(root.rglob(csv_name))), table)
    lines = _read_lines(table)
    image_dir = root / "images" if (root / "images").is_dir() else root
    images = _index_images(image_dir)
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or len(parts) % 2 == 0:
            raise _fail(table, line_no,
                        f"expected 'image_id,x0,y0,...' with an even number of coordinates, got {len(parts) - 1}")
        coords = np.asarray([_parse_float(p, table, line_no) for p in parts[1:]], dtype=np.float64).reshape(-1, 2)
        for idx in wrist_indices:
            if idx >= coords.shape[0]:
                raise _fail(table, line_no, f"wrist landmark index {idx} out of range for {coords.shape[0]} landmarks")
        # Spacing from the wrist width, before selecting a subset of landmarks.
        dist = float(np.linalg.norm(coords[wrist_indices[0]] - coords[wrist_indices[1]]))
        if not dist > 0:
            raise _fail(table, line_no, f"wrist landmarks {tuple(wrist_indices)} coincide or are missing")
        spacing = (wrist_mm / dist, wrist_mm / dist)
        if landmark_indices is not None:
            coords = coords[list(landmark_indices)]
        image_id = parts[0]
        path = images.get(image_id, image_dir / f"{image_id}.jpg")
        records.append(Record(image_id, path, coords, spacing, source=_where(table, line_no)))
    return _fraction_split(records, split, train_fraction, "hand")


def chest_records(root, split="train", train_fraction=229 / 279):
    """Shenzhen chest: ``CHNCXR_*.png`` with a ``CHNCXR_*.txt`` (``6`` then six ``x y`` fractions)."""
    root = Path(root)
    _require_dir(root, "chest data")
    images = _index_images(root, "CHNCXR_*")
    labels = {p.stem: p for p in sorted(root.rglob("CHNCXR_*.txt"))}
    if not labels:
        raise DatasetFormatError(f"{root}: no CHNCXR_*.txt label files found")
    records = []
    for stem, label in sorted(labels.items()):
        lines = _read_lines(label)
        header = lines[0].strip() if lines else ""
        if not header.isdigit():
            raise _fail(label, 1, f"expected the landmark count, got {header!r}")
        points = _parse_points(lines, label, int(header), first_line=2, sep=" ")
        if np.any((points < 0) | (points > 1)):
            raise _fail(label, 2, "landmarks must be fractions of the image width/height in [0, 1]")
        path = images.get(stem, label.with_suffix(".png"))
        records.append(Record(stem, path, points, source=str(label), relative=True))
    return _fraction_split(records, split, train_fraction, "chest")


def _custom_sample(image, coords, spacing, split, base: Path, where: str, line, table):
    if not image:
        raise _fail(table, line, "missing image path")
    if len(coords) < 2 or len(coords) % 2:
        raise _fail(table, line, f"expected x0, y0, x1, y1, ... (an even number of coordinates), got {len(coords)}")
    path = Path(image)
    path = path if path.is_absolute() else base / path
    if spacing is None:
        spacing = (float("nan"), float("nan"))
    elif len(spacing) == 1:
        spacing = (spacing[0], spacing[0])
    arr = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return Record(Path(image).stem, path, arr, tuple(float(s) for s in spacing), source=where), split


def csv_records(root, split="train", train_fraction=0.8, file=None):
    """Generic CSV (``image_path,x0,y0,...[,spacing|,spacing_x,spacing_y][,split]``) or JSON.

    CSV: an optional header names the columns (``image``/``image_path``, ``x0``, ``y0``, ...,
    ``spacing``/``spacing_x``/``spacing_y``, ``split``); without one, the columns are the
    path then the coordinates (an odd count of numbers: the last is the spacing).  JSON:
    a list (or ``{"samples": [...]}``) of ``{"image": ..., "landmarks": [[x, y], ...],
    "spacing": s or [sx, sy], "split": ...}``.  Paths are relative to the file's folder.
    Without a split column, the first ``train_fraction`` are ``train``, the rest ``test``.
    """
    root = Path(root)
    if file is None:
        if root.is_file():
            file = root
        else:
            candidates = [root / n for n in ("landmarks.csv", "landmarks.json", "annotations.csv", "annotations.json")]
            file = next((c for c in candidates if c.is_file()), None)
            if file is None:
                raise DatasetFormatError(
                    f"{root}: no landmarks.csv/landmarks.json (or annotations.*) found; pass file="
                )
    table = Path(file)
    base = table.parent
    rows = []
    if table.suffix.lower() == ".json":
        try:
            data = json.loads(table.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetFormatError(f"{table}: annotation file not found") from None
        except json.JSONDecodeError as exc:
            raise _fail(table, exc.lineno, f"invalid JSON ({exc.msg})") from None
        samples = data.get("samples") if isinstance(data, dict) else data
        if not isinstance(samples, list):
            raise DatasetFormatError(f"{table}: expected a list of samples or {{'samples': [...]}}")
        for k, s in enumerate(samples):
            where = f"{table}, sample {k}"
            if not isinstance(s, dict) or "landmarks" not in s:
                raise DatasetFormatError(f"{where}: expected an object with 'image' and 'landmarks'")
            try:
                coords = [float("nan") if v is None else float(v) for pt in s["landmarks"] for v in pt]
            except (TypeError, ValueError):
                raise DatasetFormatError(f"{where}: landmarks must be a list of [x, y] numbers") from None
            spacing = s.get("spacing")
            if spacing is not None:
                spacing = [float(v) for v in (spacing if isinstance(spacing, list) else [spacing])]
            image = s.get("image") or s.get("image_path")
            rows.append(_custom_sample(image, coords, spacing, s.get("split"), base, where, None, table))
    else:
        lines = _read_lines(table)
        reader = list(csv.reader(lines))
        header = None
        if reader and reader[0] and len(reader[0]) > 1:
            try:
                float(reader[0][1])
            except ValueError:
                header = [h.strip().lower() for h in reader[0]]
        for line_no, cells in enumerate(reader, 1):
            if header is not None and line_no == 1 or not any(c.strip() for c in cells):
                continue
            cells = [c.strip() for c in cells]
            where = _where(table, line_no)
            if header is not None:
                if len(cells) != len(header):
                    raise _fail(table, line_no, f"expected {len(header)} columns (the header), got {len(cells)}")
                row = dict(zip(header, cells))
                image = row.get("image_path", row.get("image", cells[0]))
                coord_cols = [h for h in header if h[:1] in "xy" and h[1:].isdigit()]
                coord_cols.sort(key=lambda h: (int(h[1:]), h[0]))
                coords = [_parse_float(row[h], table, line_no) for h in coord_cols]
                spacing = None
                if "spacing" in row:
                    spacing = [_parse_float(row["spacing"], table, line_no)]
                elif "spacing_x" in row:
                    spacing = [_parse_float(row[k], table, line_no) for k in ("spacing_x", "spacing_y")]
                rows.append(_custom_sample(image, coords, spacing, row.get("split"), base, where, line_no, table))
            else:
                numbers = [_parse_float(c, table, line_no) for c in cells[1:]]
                spacing = [numbers.pop()] if len(numbers) % 2 else None
                rows.append(_custom_sample(cells[0], numbers, spacing, None, base, where, line_no, table))
    if any(s is not None for _, s in rows):
        return [r for r, s in rows if split == "all" or s == split]
    return _fraction_split([r for r, _ in rows], split, train_fraction, "csv")


_RECORD_READERS = {"isbi2015": isbi2015_records, "hand": hand_records, "chest": chest_records, "csv": csv_records}


def load_dataset(name: str = "synthetic", root=None, split: str = "train", image_size=None, **options) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`) as a torch ``Dataset`` of dicts.

    ``image_size`` is ``(H, W)`` (default: :data:`DEFAULT_IMAGE_SIZE`).  ``options``:
    ``augment`` (bool or a dict of :func:`augment_sample` ranges), ``seed`` and ``cache``
    (keep the resized images in memory) for every dataset; ``thresholds``; plus per
    dataset: synthetic ``num_samples``, ``difficulty``; isbi2015 ``protocol`` (``paper``/``challenge``),
    ``annotator``; hand ``wrist_indices``, ``wrist_mm``, ``landmark_indices``,
    ``train_fraction``; chest ``train_fraction``; csv ``file``, ``train_fraction``.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {DATASETS}, got {name!r}")
    image_size = _check_size(image_size if image_size is not None else DEFAULT_IMAGE_SIZE[name])
    thresholds = tuple(options.pop("thresholds", None) or DEFAULT_THRESHOLDS[name])
    if name == "synthetic":
        ds = SyntheticLandmarks(split, image_size, **options)
        ds.thresholds = thresholds
        return ds
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the folder with the data set's files)")
    if not Path(root).exists():
        raise DatasetFormatError(f"{root}: dataset root not found")
    augment = options.pop("augment", False)
    seed = options.pop("seed", 0)
    cache = options.pop("cache", False)
    records = _RECORD_READERS[name](root, split=split, **options)
    return LandmarkDataset(records, image_size, augment=augment, seed=seed, thresholds=thresholds, name=name,
                           cache=cache)


def collate(items: Sequence[dict]) -> dict:
    """Stack a list of items into a batch (ids stay a list)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "landmarks": torch.stack([it["landmarks"] for it in items]),
        "spacing": torch.stack([it["spacing"] for it in items]),
        "id": [it["id"] for it in items],
    }


def _preview(argv=None) -> None:  # pragma: no cover - manual inspection helper
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coorkern.data", description="Write a PNG preview of a dataset.")
    parser.add_argument("--data", default="synthetic", choices=DATASETS)
    parser.add_argument("--root")
    parser.add_argument("--split", default="train")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--out", default="preview.png")
    args = parser.parse_args(argv)
    from ._runs import save_overlay

    ds = load_dataset(args.data, args.root, args.split)
    for i in range(min(args.count, len(ds))):
        item = ds[i]
        stem, ext = os.path.splitext(args.out)
        save_overlay(f"{stem}_{i}{ext or '.png'}", item["image"], item["landmarks"])


if __name__ == "__main__":  # pragma: no cover
    _preview()
