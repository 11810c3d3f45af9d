"""Synthetic radiographs: a procedural "cephalogram" generator and its dataset.

Grey-level images of a skull ring, a facial profile, a jaw, a row of identical teeth, a
column of identical vertebrae and several identical small rings, under a random pose,
scale and smooth non-rigid deformation, with shape variation, bone texture, intensity
inhomogeneity, blur and noise.  Many landmarks sit on one of a set of locally identical
structures (the 2nd of 8 teeth, a corner of the 4th of 5 vertebrae, the centre of one of
five rings), so local appearance alone cannot name them.  Every image is a pure function
of ``(seed, split, index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._common import check_size, normalize, seed_for, single_thread
from .augment import _Augmenting

__all__ = ["NUM_SYNTHETIC_LANDMARKS", "SYNTHETIC_THRESHOLDS", "SyntheticLandmarks", "render_synthetic"]

SYNTHETIC_THRESHOLDS = (2.0, 2.5, 3.0, 4.0)  # SDR radii, mm

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
    h, w = check_size(image_size)
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
        self.image_size = check_size(image_size)
        self.num_samples = self.SPLIT_SIZES[split] if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.difficulty = float(difficulty)
        self.cache = cache
        self.chunk = int(chunk)
        h, w = self.image_size
        self.spacing = torch.tensor([field_of_view_mm / w, field_of_view_mm / h], dtype=torch.float32)
        self.num_landmarks = NUM_SYNTHETIC_LANDMARKS
        self.thresholds = SYNTHETIC_THRESHOLDS
        self._images: Optional[torch.Tensor] = None
        self._landmarks: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.num_samples

    def _seeds(self, indices) -> list[int]:
        return [seed_for("synthetic", self.seed, self.split, int(i)) for i in indices]

    def _render(self, indices):
        with single_thread():
            images, landmarks = render_synthetic(self._seeds(indices), self.image_size, self.difficulty)
        return normalize(images), landmarks

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

