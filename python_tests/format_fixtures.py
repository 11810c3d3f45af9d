"""Writers of tiny fixture files in each public data set's exact layout (shared by the tests)."""

import numpy as np
from PIL import Image as PIL


def save_image(path, h, w, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    array = (rng.random((h, w)) * 255).astype(np.uint8)
    image = PIL.fromarray(array, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    image.save(path)


def isbi_fixture(root, ids=(1, 2, 151), size=(60, 50)):
    pts = {}
    for n in ids:
        stem = f"{n:03d}"
        folder = "TrainingData" if n <= 150 else "Test1Data"
        save_image(root / "RawImage" / folder / f"{stem}.bmp", *size)
        base = np.stack([np.arange(19) * 2.0 + n, np.arange(19) + 10.0], 1)
        for who, shift in (("senior", 0.0), ("junior", 2.0)):
            lines = [f"{x + shift:g},{y - shift:g}" for x, y in base] + ["1", "2", "3"]  # + classification lines
            path = root / "AnnotationsByMD" / f"400_{who}" / f"{stem}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
        pts[stem] = base + np.array([1.0, -1.0])  # mean of the two doctors
    return pts


def hand_fixture(root, n=3, size=(40, 30)):
    rows = []
    for i in range(n):
        coords = np.stack([np.linspace(2, 25, 37), np.linspace(3, 35, 37)], 1) + i
        coords[5] = coords[1] + np.array([3.0, 4.0])  # wrist width: 5 px
        rows.append(f"{1000 + i}," + ",".join(f"{v:g}" for v in coords.reshape(-1)))
        save_image(root / "images" / f"{1000 + i}.jpg", *size, mode="RGB")
    (root / "all.csv").write_text("\n".join(rows) + "\n")
    return rows


def chest_fixture(root, n=3, size=(40, 60)):
    for i in range(n):
        save_image(root / "pngs" / f"CHNCXR_{i:04d}_0.png", *size)
        label = root / "labels" / f"CHNCXR_{i:04d}_0.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("6\n" + "\n".join(f"{0.1 * k + 0.05:.3f} {0.5 - 0.05 * k:.3f}" for k in range(6)) + "\n")
