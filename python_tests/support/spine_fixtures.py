"""Tiny spines: vertebra corners from tilts and centres, and AASCE / BoostNet layout fixtures on disk."""

import math

import numpy as np
from PIL import Image as PIL

NUM_VERTEBRAE = 17


def spine_corners(tilts_deg, centres, height=10.0, width=40.0) -> np.ndarray:
    """(68, 2) corners (TL, TR, BL, BR per vertebra, y down) of vertebrae with the given
    tilts (degrees; positive = the right side lower) and centres ``(17, 2)``."""
    points = []
    for tilt, (cx, cy) in zip(tilts_deg, centres):
        t = math.radians(tilt)
        across = np.array([math.cos(t), math.sin(t)]) * width / 2  # left -> right
        down = np.array([-math.sin(t), math.cos(t)]) * height / 2  # top -> bottom
        c = np.array([cx, cy], dtype=np.float64)
        points += [c - across - down, c + across - down, c - across + down, c + across + down]
    return np.asarray(points)


def c_curve_centres(bulge=60.0, drift=-20.0, spacing=30.0, x0=100.0, y0=20.0) -> np.ndarray:
    """Centres on a single bulge to the right (every end-plate centre on one side of the chord)."""
    t = np.linspace(0.0, 1.0, NUM_VERTEBRAE)
    return np.stack([x0 + bulge * np.sin(np.pi * t) + drift * t, y0 + spacing * np.arange(NUM_VERTEBRAE)], 1)


def s_curve_centres(amplitude=40.0, spacing=30.0, x0=100.0, y0=20.0) -> np.ndarray:
    """Centres on one full sine period: right above, left below (an S)."""
    t = np.linspace(0.0, 1.0, NUM_VERTEBRAE)
    return np.stack([x0 + amplitude * np.sin(2 * np.pi * t), y0 + spacing * np.arange(NUM_VERTEBRAE)], 1)


def _save_image(path, size_hw, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.fromarray((rng.random(size_hw) * 255).astype(np.uint8), mode="L").save(path)


def spine_fixture(root, names, folder="training", sizes=None, csv=True, angles=True, images=True):
    """Write the distributed layout for ``names`` under ``root``; returns ``{name: (points, (H, W), angles)}``.

    ``data/<folder>/<name>`` (tiny images, format from the suffix), ``labels/<folder>/``
    ``filenames.csv``, ``<name>.mat`` (``p2`` 68 x 2 pixels; uint16 like the real files for
    even rows), ``landmarks.csv`` (x1..x68 then y1..y68 as fractions) and ``angles.csv``.
    ``images``: ``True`` for all, or a set of the names to write images for.
    """
    import scipy.io

    labels = root / "labels" / folder
    labels.mkdir(parents=True, exist_ok=True)
    truth, csv_rows, angle_rows = {}, [], []
    for row, name in enumerate(names):
        h, w = sizes[row] if sizes is not None else (70 + row % 5, 24 + row % 3)
        x = np.linspace(4, w - 5, 4)[[0, 3, 0, 3]] + np.zeros((NUM_VERTEBRAE, 1))
        y = np.arange(NUM_VERTEBRAE)[:, None] * 3.5 + np.array([2, 2, 4, 4]) + row % 2
        points = np.stack([x.reshape(-1) + row % 3, y.reshape(-1)], 1)
        if row % 2 == 0:
            points = np.round(points)
        p2 = points.astype(np.uint16) if row % 2 == 0 else points
        scipy.io.savemat(str(labels / f"{name}.mat"), {"p2": p2})
        if images is True or name in images:
            _save_image(root / "data" / folder / name, (h, w), row)
        cobb = np.array([10.0 + row, 5.0 + row / 2, 4.5])
        truth[name] = (points, (h, w), cobb)
        csv_rows.append(",".join(f"{v:.6g}" for v in np.concatenate([points[:, 0] / w, points[:, 1] / h])))
        angle_rows.append(",".join(f"{v:g}" for v in cobb))
    (labels / "filenames.csv").write_text("".join(n + "\n" for n in names))
    if csv:
        (labels / "landmarks.csv").write_text("".join(r + "\n" for r in csv_rows))
    if angles:
        (labels / "angles.csv").write_text("".join(r + "\n" for r in angle_rows))
    return truth


def aasce_names(count, offset=0):
    """``count`` names in the distributed style (spaces, capital letters)."""
    return [f"sunhl-1th-{(offset + i) % 28 + 1:02d}-Jan-2017-{offset + i + 100} {'ABCD'[i % 4]} AP.jpg"
            for i in range(count)]
