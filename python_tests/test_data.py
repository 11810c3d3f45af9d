"""Synthetic generator and public-format loaders (fixtures written here in each exact format)."""

import json
import math

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from coorkern import data  # noqa: E402
from coorkern.metrics import decode_heatmaps  # noqa: E402
from format_fixtures import chest_fixture, hand_fixture, isbi_fixture, save_image  # noqa: E402


# ---------------------------------------------------------------------------
# Synthetic


def test_synthetic_item_contract_and_determinism():
    ds = data.load_dataset("synthetic", split="train", image_size=(48, 64), num_samples=3, seed=5)
    item = ds[1]
    assert item["image"].shape == (1, 48, 64) and item["image"].dtype == torch.float32
    assert item["landmarks"].shape == (19, 2) and item["spacing"].shape == (2,)
    assert item["image"].mean().abs() < 1e-4 and (item["image"].std() - 1).abs() < 1e-3
    assert item["spacing"].tolist() == pytest.approx([102.4 / 64, 102.4 / 48])
    assert isinstance(item["id"], str)
    again = data.load_dataset("synthetic", split="train", image_size=(48, 64), num_samples=3, seed=5, cache=False)
    assert torch.equal(again[1]["image"], item["image"]) and torch.equal(again[1]["landmarks"], item["landmarks"])
    other_seed = data.load_dataset("synthetic", split="train", image_size=(48, 64), num_samples=3, seed=6)[1]
    other_split = data.load_dataset("synthetic", split="test", image_size=(48, 64), num_samples=3, seed=5)[1]
    for other in (other_seed, other_split):
        assert not torch.allclose(other["landmarks"], item["landmarks"])
    # Different items differ in pose: landmark 0 moves by more than a pixel somewhere.
    lms = ds.all_landmarks()
    assert (lms[:, 0] - lms[0, 0]).norm(dim=-1).max() > 1.0


def test_synthetic_landmarks_follow_the_warp():
    """Draw a dot at every canonical landmark through the same pose + non-rigid warp: the
    dots must peak at the landmark coordinates the generator reports."""
    seeds = [11, 12, 13]

    def dots(u, landmarks_c):  # u (B, N, 2), landmarks (B, L, 2) in canonical space
        d2 = ((u[:, None, :, :] - landmarks_c[:, :, None, :]) ** 2).sum(-1)
        return torch.exp(-d2 / (2 * 0.03**2))

    maps, lms = data.render_synthetic(seeds, (96, 80), scene_fn=dots)
    assert maps.shape == (3, 19, 96, 80)
    found, _ = decode_heatmaps(maps, logits=False)
    inside = (lms[..., 0] > 2) & (lms[..., 0] < 77) & (lms[..., 1] > 2) & (lms[..., 1] < 93)
    assert inside.float().mean() > 0.8
    err = (found - lms).norm(dim=-1)[inside]
    assert err.max() < 0.25, err.max()
    # And the real images are a pure function of the seed.
    a, la = data.render_synthetic(seeds, (32, 32))
    b, lb = data.render_synthetic(seeds, (32, 32))
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_synthetic_inverse_warp_is_exact():
    params = data._draw_params([1, 2, 3, 4], 1.5)
    u = torch.rand(4, 19, 2, dtype=torch.float64) * 1.6 - 0.8
    p = data._canonical_to_image(u, params)
    assert (data._image_to_canonical(p, params) - u).abs().max() < 1e-9


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("synthetic", split="nope")
    with pytest.raises(ValueError, match="num_samples"):
        data.load_dataset("synthetic", num_samples=0)
    with pytest.raises(ValueError, match="dataset name"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="root"):
        data.load_dataset("isbi2015")


def test_augmentation_moves_landmarks_exactly():
    h, w = 64, 80
    lm = torch.tensor([[20.3, 15.7], [60.2, 40.4], [35.5, 30.1]])
    from coorkern.reference import gaussian_heatmaps

    image = gaussian_heatmaps(lm, h, w, 2.0)  # (3, H, W): one dot per channel
    gen = torch.Generator().manual_seed(3)
    out, moved = data.augment_sample(image, lm, gen, rotation=20, scale=0.15, translation=0.05, intensity=0.0)
    assert not torch.allclose(moved, lm, atol=0.5)  # it did move
    found, _ = decode_heatmaps(out[None], logits=False)
    assert (found[0] - moved).abs().max() < 0.2


def test_augmented_dataset_is_seeded_by_epoch_and_index():
    ds = data.load_dataset("synthetic", image_size=(40, 40), num_samples=2, augment=True)
    first = ds[0]["landmarks"]
    assert torch.equal(ds[0]["landmarks"], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["landmarks"], first)


# ---------------------------------------------------------------------------
# Public formats


def test_isbi2015_parsing_resize_spacing_and_splits(tmp_path):
    pts = isbi_fixture(tmp_path)
    ds = data.load_dataset("isbi2015", tmp_path, "train", image_size=(30, 40))
    assert [r.id for r in ds.records] == ["001", "002"]
    item = ds[0]
    assert item["image"].shape == (1, 30, 40)
    expected = (torch.tensor(pts["001"]) + 0.5) * torch.tensor([40 / 50, 30 / 60]) - 0.5
    assert torch.allclose(item["landmarks"], expected.float(), atol=1e-5)
    assert item["spacing"].tolist() == pytest.approx([0.1 * 50 / 40, 0.1 * 60 / 30])
    assert [r.id for r in data.load_dataset("isbi2015", tmp_path, "test", image_size=(30, 40)).records] == ["151"]
    cached = data.load_dataset("isbi2015", tmp_path, "train", image_size=(30, 40), cache=True)
    first = cached[0]
    first["image"].zero_()  # the caller's copy: the cache keeps its own
    assert torch.equal(cached[0]["image"], item["image"]) and torch.equal(cached[0]["landmarks"], item["landmarks"])
    challenge = data.load_dataset("isbi2015", tmp_path, "test1", image_size=(30, 40), protocol="challenge")
    assert [r.id for r in challenge.records] == ["151"]
    senior = data.load_dataset("isbi2015", tmp_path, "train", image_size=(60, 50), annotator="senior")
    assert torch.allclose(senior[0]["landmarks"], torch.tensor(pts["001"] - np.array([1.0, -1.0])).float())
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("isbi2015", tmp_path, "test2")


def test_isbi2015_errors_name_file_and_line(tmp_path):
    isbi_fixture(tmp_path)
    bad = tmp_path / "AnnotationsByMD" / "400_junior" / "002.txt"
    lines = bad.read_text().splitlines()
    lines[4] = "12,abc"
    bad.write_text("\n".join(lines))
    with pytest.raises(data.DatasetFormatError, match=r"002\.txt, line 5: expected a number"):
        data.load_dataset("isbi2015", tmp_path, "train")
    bad.write_text("1,2\n3,4\n")  # truncated
    with pytest.raises(data.DatasetFormatError, match=r"002\.txt, line 3"):
        data.load_dataset("isbi2015", tmp_path, "train")
    bad.unlink()
    with pytest.raises(data.DatasetFormatError, match=r"400_junior.002\.txt: annotation file not found"):
        data.load_dataset("isbi2015", tmp_path, "train")


def test_missing_and_corrupt_images_are_errors(tmp_path):
    isbi_fixture(tmp_path)
    (tmp_path / "RawImage" / "TrainingData" / "002.bmp").write_bytes(b"not a bitmap")
    ds = data.load_dataset("isbi2015", tmp_path, "train", image_size=(30, 40))
    with pytest.raises(data.DatasetFormatError, match=r"002\.bmp: cannot read image"):
        ds[1]
    (tmp_path / "RawImage" / "TrainingData" / "001.bmp").unlink()  # annotated, but the image is gone
    with pytest.raises(data.DatasetFormatError, match=r"001\.bmp: image file not found \(annotated in .*001\.txt"):
        data.load_dataset("isbi2015", tmp_path, "train")


def test_hand_parsing_spacing_from_wrist_and_splits(tmp_path):
    hand_fixture(tmp_path)
    ds = data.load_dataset("hand", tmp_path, "train", image_size=(20, 15))
    assert len(ds) == 2 and [r.id for r in ds.records] == ["1000", "1001"]  # 609/909 of 3 -> 2
    assert len(data.load_dataset("hand", tmp_path, "test", image_size=(20, 15))) == 1
    item = ds[0]
    assert item["landmarks"].shape == (37, 2)
    # 50 mm over 5 original pixels = 10 mm/px; halving the image doubles it.
    assert item["spacing"].tolist() == pytest.approx([20.0, 20.0])
    subset = data.load_dataset("hand", tmp_path, "all", image_size=(40, 30), landmark_indices=[0, 5])
    assert subset.num_landmarks == 2
    assert subset[0]["landmarks"][1].tolist() == pytest.approx([2 + 23 / 36 + 3, 3 + 32 / 36 + 4], abs=1e-4)


def test_hand_bad_row_names_line(tmp_path):
    rows = hand_fixture(tmp_path)
    rows[1] = rows[1].rsplit(",", 1)[0]  # an odd number of coordinates
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(data.DatasetFormatError, match=r"all\.csv, line 2"):
        data.load_dataset("hand", tmp_path, "train")


def test_chest_fractions_and_pixel_metric(tmp_path):
    chest_fixture(tmp_path)
    ds = data.load_dataset("chest", tmp_path, "all", image_size=(20, 30))
    item = ds[0]
    assert item["landmarks"].shape == (6, 2)
    expected_x = (0.05 * 60 + 0.5) * 0.5 - 0.5
    assert item["landmarks"][0].tolist() == pytest.approx([expected_x, (0.5 * 40 + 0.5) * 0.5 - 0.5], abs=1e-5)
    assert torch.isnan(item["spacing"]).all()
    assert ds.thresholds == (3.0, 6.0, 9.0)
    bad = tmp_path / "labels" / "CHNCXR_0001_0.txt"
    bad.write_text("6\n0.1 0.2\n0.1\n")
    with pytest.raises(data.DatasetFormatError, match=r"CHNCXR_0001_0\.txt, line 3"):
        data.load_dataset("chest", tmp_path, "all")


def test_generic_csv_with_header_spacing_and_split(tmp_path):
    save_image(tmp_path / "img" / "a.png", 20, 10)
    save_image(tmp_path / "img" / "b.tif", 20, 10)
    (tmp_path / "landmarks.csv").write_text(
        "image_path,x0,y0,x1,y1,spacing,split\n"
        "img/a.png,1,2,3,4,0.5,train\n"
        "img/b.tif,5,6,nan,nan,0.5,test\n"
    )
    train = data.load_dataset("csv", tmp_path, "train", image_size=(20, 10))
    assert len(train) == 1
    item = train[0]
    assert item["landmarks"].tolist() == [[1.0, 2.0], [3.0, 4.0]] and item["spacing"].tolist() == [0.5, 0.5]
    test = data.load_dataset("csv", tmp_path / "landmarks.csv", "test", image_size=(40, 20))
    assert torch.isnan(test[0]["landmarks"][1]).all()
    assert test[0]["spacing"].tolist() == [0.25, 0.25]


def test_generic_csv_without_header_and_json(tmp_path):
    save_image(tmp_path / "a.png", 20, 10)
    (tmp_path / "plain.csv").write_text("a.png,1,2,3,4\na.png,1,2,3,4,5,6\n")
    with pytest.raises(data.DatasetFormatError, match="different numbers"):
        data.load_dataset("csv", tmp_path / "plain.csv", "all", image_size=(20, 10))  # 2 points, then 3
    (tmp_path / "plain.csv").write_text("a.png,1,2,3,4,0.2\na.png,1,2,3,4,0.2\n")
    ds = data.load_dataset("csv", tmp_path / "plain.csv", "all", image_size=(20, 10))
    assert ds[0]["spacing"].tolist() == pytest.approx([0.2, 0.2])
    (tmp_path / "bad.csv").write_text("a.png,1,2,3,4\na.png,1,x,3,4\n")
    with pytest.raises(data.DatasetFormatError, match=r"bad\.csv, line 2: expected a number"):
        data.load_dataset("csv", tmp_path / "bad.csv", "all")
    samples = [{"image": "a.png", "landmarks": [[1, 2], [3, 4]], "spacing": [0.1, 0.2]}] * 5
    (tmp_path / "landmarks.json").write_text(json.dumps({"samples": samples}))
    ds = data.load_dataset("csv", tmp_path / "landmarks.json", "train", image_size=(20, 10))
    assert len(ds) == 4 and ds[0]["spacing"].tolist() == pytest.approx([0.1, 0.2])
    (tmp_path / "broken.json").write_text('{"samples": [\n{"image": "a.png",,}]}')
    with pytest.raises(data.DatasetFormatError, match=r"broken\.json, line 2"):
        data.load_dataset("csv", tmp_path / "broken.json", "all")
    (tmp_path / "missing.csv").write_text("gone.png,1,2\n")
    with pytest.raises(data.DatasetFormatError, match=r"gone\.png: image file not found.*missing\.csv, line 1"):
        data.load_dataset("csv", tmp_path / "missing.csv", "all")


def test_missing_root_and_files(tmp_path):
    with pytest.raises(data.DatasetFormatError, match="dataset root not found"):
        data.load_dataset("hand", tmp_path / "nowhere")
    with pytest.raises(data.DatasetFormatError, match=r"all\.csv: annotation file not found"):
        data.load_dataset("hand", tmp_path)
    with pytest.raises(data.DatasetFormatError, match="AnnotationsByMD"):
        data.load_dataset("isbi2015", tmp_path)


def test_sixteen_bit_images_are_read_as_unit_range(tmp_path):
    array = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    PIL.fromarray(array).save(tmp_path / "x.png")
    image = data.read_image(tmp_path / "x.png")
    assert image.shape == (1, 3, 4)
    assert float(image.max()) == pytest.approx(55000 / 65535, rel=1e-4)
    assert math.isclose(float(image.min()), 0.0)
