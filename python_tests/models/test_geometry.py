"""Pixel conventions kept together: resize, augmentation and the detector's pad/crop.

Landmarks use pixel centres at integer coordinates (x_new + 0.5 = (x_old + 0.5) * new / old).
Each test draws a bright dot at a known sub-pixel position in an image file, lets the public
pipeline transform it, and checks that the dot's peak and the reported landmark stay together;
a resize with the other corner convention (align_corners=True) moves them ~0.3 px apart here.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

PIL = pytest.importorskip("PIL.Image")

from coorkern import data  # noqa: E402
from coorkern.metrics import decode_heatmaps  # noqa: E402
from coorkern.models import CoorDetector  # noqa: E402

# Original images 100 x 120 (H x W) resized 4x down to 25 x 30, the dots near the borders where
# the two corner conventions differ most: x 15 -> 3.375 (align_corners=True: 3.655).
ORIGINAL = (100, 120)
RESIZED = (25, 30)
DOTS = [(15.0, 13.5), (104.6, 86.2), (61.3, 40.7)]
SIGMA = 6.0  # original pixels: 1.5 px after the 4x reduction


def write_dot_image(path, x, y, size=ORIGINAL, sigma=SIGMA):
    """A 16-bit PNG with one Gaussian dot at (x, y) (pixel centres at integers)."""
    h, w = size
    rows, cols = np.mgrid[0:h, 0:w]
    dot = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))
    PIL.fromarray(np.round(dot * 65535).astype(np.uint16)).save(path)


def dot_dataset(tmp_path, dots=DOTS, **options):
    rows = ["image,x0,y0"]
    for i, (x, y) in enumerate(dots):
        write_dot_image(tmp_path / f"dot{i}.png", x, y)
        rows.append(f"dot{i}.png,{x},{y}")
    (tmp_path / "landmarks.csv").write_text("\n".join(rows) + "\n")
    return data.load_dataset("csv", tmp_path, "all", image_size=RESIZED, **options)


def peak_of(image):
    """Sub-pixel peak (x, y) of a (1, H, W) normalized image with one bright dot."""
    positive = image - image.min() + 1e-6
    coords, _ = decode_heatmaps(positive[None], logits=False)
    return coords[0, 0]


def test_resize_keeps_the_dot_on_its_landmark(tmp_path):
    ds = dot_dataset(tmp_path)
    scale = torch.tensor([RESIZED[1] / ORIGINAL[1], RESIZED[0] / ORIGINAL[0]], dtype=torch.float64)
    for i, (x, y) in enumerate(DOTS):
        item = ds[i]
        expected = (torch.tensor([x, y], dtype=torch.float64) + 0.5) * scale - 0.5
        assert torch.allclose(item["landmarks"][0].double(), expected, atol=1e-5)
        found = peak_of(item["image"])
        assert (found.double() - expected).abs().max() < 0.02, (i, found, expected)


def test_all_landmarks_equal_the_items_landmarks(tmp_path):
    """all_landmarks() (the mean-shape baseline's input) scales like the items do."""
    ds = dot_dataset(tmp_path)
    items = torch.stack([ds[i]["landmarks"] for i in range(len(ds))])
    torch.testing.assert_close(ds.all_landmarks(), items, atol=1e-5, rtol=0)


def test_all_landmarks_of_relative_annotations(tmp_path):
    from support.format_fixtures import chest_fixture

    chest_fixture(tmp_path)
    ds = data.load_dataset("chest", tmp_path, "all", image_size=(25, 24))
    items = torch.stack([ds[i]["landmarks"] for i in range(len(ds))])
    torch.testing.assert_close(ds.all_landmarks(), items, atol=1e-5, rtol=0)


def test_augmented_items_keep_the_dot_on_its_landmark(tmp_path):
    ds = dot_dataset(tmp_path, augment=dict(rotation=15, scale=0.1, translation=0.05, intensity=0.0))
    plain = dot_dataset(tmp_path)
    for i in range(len(ds)):
        item = ds[i]
        assert (item["landmarks"] - plain[i]["landmarks"]).abs().max() > 0.05  # it moved
        found = peak_of(item["image"])
        assert (found - item["landmarks"][0]).abs().max() < 0.1, (i, found, item["landmarks"][0])


def test_augmentation_differs_between_items_of_one_epoch(tmp_path):
    """The same image annotated twice: the two items get different random transforms."""
    write_dot_image(tmp_path / "same.png", 60.0, 50.0)
    (tmp_path / "landmarks.csv").write_text("image,x0,y0\nsame.png,60,50\nsame.png,60,50\n")
    ds = data.load_dataset("csv", tmp_path, "all", image_size=RESIZED, augment=True)
    first, second = ds[0], ds[1]
    assert not torch.allclose(first["landmarks"], second["landmarks"], atol=1e-3)
    assert not torch.allclose(first["image"], second["image"], atol=1e-3)
    assert torch.equal(ds[1]["landmarks"], second["landmarks"])  # and each is reproducible


@pytest.mark.parametrize("size", [(40, 70), (33, 64), (64, 45)])
def test_detector_crops_the_padded_output_at_the_top_left(size):
    """Padding to a multiple of 32 goes at the bottom/right; the logits are cropped back there."""
    torch.manual_seed(0)
    model = CoorDetector(base_channels=2, num_landmarks=2, transformer="none").eval()
    h, w = size
    images = torch.randn(1, 1, h, w)
    ph, pw = model.padded_size(h, w)
    with torch.no_grad():
        logits = model(images)
        padded = model(F.pad(images, (0, pw - w, 0, ph - h)))
        elsewhere = model(F.pad(images, (pw - w, 0, ph - h, 0)))
    assert logits.shape == (1, 2, h, w)
    torch.testing.assert_close(logits, padded[..., :h, :w], atol=1e-5, rtol=1e-5)
    # The check can fail: the same image padded at the top/left gives other logits.
    assert (elsewhere[..., ph - h:, pw - w:] - logits).abs().max() > 1e-3
