"""Augmentation ranges and the dataset options around it (seed, epoch, cache, defaults).

Complements test_geometry.py (image and landmarks stay together): here the random draws
themselves -- rotation about the image centre, a similarity transform, the ranges and their
defaults, gamma, and which inputs seed them.
"""

import math

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from coorkern import data  # noqa: E402
from coorkern.data import LandmarkDataset  # noqa: E402

H, W = 30, 40
CENTRE = ((W - 1) / 2, (H - 1) / 2)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def ramp():
    """A normalized, asymmetric ramp image (1, H, W) (what the datasets hand to augmentation)."""
    x = torch.linspace(0, 1, W) ** 2 + torch.linspace(0, 0.3, H)[:, None]
    return ((x - x.mean()) / x.std())[None]


def landmarks():
    return torch.tensor([CENTRE, (5.0, 4.0), (33.0, 25.0), (8.0, 22.0)])


def moved(seed, **ranges):
    options = dict(rotation=0.0, scale=0.0, translation=0.0, intensity=0.0)
    options.update(ranges)
    return data.augment_sample(ramp(), landmarks(), generator(seed), **options)


def test_rotation_and_scale_are_a_similarity_about_the_image_centre():
    for seed in range(6):
        _, out = moved(seed, rotation=30.0, scale=0.2)
        assert torch.allclose(out[0], torch.tensor(CENTRE), atol=1e-4)  # the centre stays put
        before = torch.cdist(landmarks()[1:], landmarks()[1:])
        after = torch.cdist(out[1:], out[1:])
        ratio = after[before > 0] / before[before > 0]
        assert ratio.max() - ratio.min() < 1e-4  # one isotropic scale
        assert 0.8 - 1e-4 <= float(ratio[0]) <= 1.2 + 1e-4


def test_draws_cover_both_sides_of_each_range():
    scales, shifts_x, shifts_y, angles = [], [], [], []
    for seed in range(12):
        _, out = moved(seed, rotation=20.0, scale=0.1)
        v0, v1 = landmarks()[2] - landmarks()[1], out[2] - out[1]
        scales.append(float(v1.norm() / v0.norm()))
        angles.append(math.degrees(math.atan2(float(v1[1]), float(v1[0])) - math.atan2(float(v0[1]), float(v0[0]))))
        _, out = moved(seed, translation=0.1)
        shift = out - landmarks()
        assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-4)  # a pure translation
        shifts_x.append(float(shift[0, 0]) / W)
        shifts_y.append(float(shift[0, 1]) / H)
    for values, bound in ((np.subtract(scales, 1), 0.1), (angles, 20.0), (shifts_x, 0.1), (shifts_y, 0.1)):
        assert max(values) <= bound + 1e-4 and min(values) >= -bound - 1e-4
        assert max(values) > 0.3 * bound and min(values) < -0.3 * bound  # both directions, a good part of the range
    assert any(x * y < 0 for x, y in zip(shifts_x, shifts_y))  # x and y drawn independently


def test_gamma_is_drawn_on_both_sides_of_one():
    """Intensity jitter: a gamma in [1 - intensity, 1 + intensity] on the [0, 1]-rescaled image
    (brightness and contrast draws are undone by the final normalization)."""
    unit = (ramp() - ramp().min()) / (ramp().max() - ramp().min())
    gammas = []
    for seed in range(10):
        out, _ = moved(seed, intensity=0.3)
        candidates = torch.linspace(0.6, 1.4, 801)
        fits = torch.stack([(data.normalize(unit**g) - out).abs().max() for g in candidates])
        assert float(fits.min()) < 1e-3  # out is the normalized unit ramp to some power
        gammas.append(float(candidates[fits.argmin()]))
    assert min(gammas) < 0.9 and max(gammas) > 1.1 and 0.7 - 1e-3 <= min(gammas) and max(gammas) <= 1.3 + 1e-3


def test_defaults_are_the_documented_ranges():
    image, lms = ramp(), landmarks()
    default = data.augment_sample(image, lms, generator(5))
    explicit = data.augment_sample(image, lms, generator(5), rotation=10.0, scale=0.1, translation=0.05,
                                   intensity=0.2)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])


def test_rotation_fills_with_the_border_value():
    image = torch.ones(1, H, W)
    image[:, :, : W // 2] = 3.0  # left half bright: a zero fill would add a third level
    out, _ = data.warp_affine(image, landmarks(), torch.tensor(
        [[math.cos(0.5), -math.sin(0.5), 0.0], [math.sin(0.5), math.cos(0.5), 0.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64))
    assert float(out.min()) >= 1.0 - 1e-5 and float(out.max()) <= 3.0 + 1e-5


# ---------------------------------------------------------------------------
# The dataset around it


def records(tmp_path, count=2):
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        path = tmp_path / f"img{i}.png"
        PIL.fromarray((rng.random((H, W)) * 255).astype(np.uint8)).save(path)
        out.append(data.Record(f"img{i}", path, np.array([[10.0, 12.0], [30.0, 5.0]])))
    return out


def test_dataset_defaults_seed_epoch_and_options(tmp_path):
    recs = records(tmp_path)
    plain = LandmarkDataset(recs, (H, W))
    assert torch.equal(plain[0]["landmarks"], plain.load(0)["landmarks"])  # no augmentation by default
    assert plain[0]["id"] == "img0"
    augmented = LandmarkDataset(recs, (H, W), augment=True)
    first = augmented[0]["landmarks"]
    assert torch.equal(LandmarkDataset(recs, (H, W), augment=True, seed=0)[0]["landmarks"], first)
    assert not torch.allclose(LandmarkDataset(recs, (H, W), augment=True, seed=1)[0]["landmarks"], first)
    augmented.set_epoch(0)
    assert torch.equal(augmented[0]["landmarks"], first)
    augmented.set_epoch(1)
    one = augmented[0]["landmarks"]
    augmented.set_epoch(2)
    assert not torch.allclose(augmented[0]["landmarks"], one) and not torch.allclose(one, first)
    still = LandmarkDataset(recs, (H, W), augment=dict(rotation=0, scale=0, translation=0, intensity=0))
    assert torch.allclose(still[0]["landmarks"], plain[0]["landmarks"], atol=1e-5)
    with pytest.raises(data.DatasetFormatError, match="^csv: no annotated images found"):
        LandmarkDataset([], (H, W))
    assert data.load_dataset("csv", _csv(tmp_path), "all", image_size=(H, W)).name == "csv"


def _csv(tmp_path):
    (tmp_path / "landmarks.csv").write_text("image,x0,y0\nimg0.png,10,12\n")
    return tmp_path


def test_cache_keeps_its_own_copy_and_is_off_by_default(tmp_path):
    recs = records(tmp_path, 1)
    cached, uncached = LandmarkDataset(recs, (H, W), cache=True), LandmarkDataset(recs, (H, W))
    before = cached[0]["image"].clone()
    assert torch.equal(uncached[0]["image"], before)
    cached[0]["image"].zero_()  # the caller's copies: the cache keeps its own
    cached[0]["image"].zero_()
    PIL.fromarray(np.full((H, W), 7, dtype=np.uint8)).save(recs[0].image_path)  # the file changes
    assert torch.equal(cached[0]["image"], before)
    assert not torch.equal(uncached[0]["image"], before)


def test_downsizing_is_antialiased(tmp_path):
    """A single bright pixel survives a 4x reduction (plain bilinear sampling would skip it)."""
    image = np.zeros((40, 40), dtype=np.uint8)
    image[8, 8] = 255
    PIL.fromarray(image).save(tmp_path / "delta.png")
    ds = LandmarkDataset([data.Record("delta", tmp_path / "delta.png", np.array([[8.0, 8.0]]))], (10, 10))
    assert float(ds[0]["image"].std()) > 0.5
