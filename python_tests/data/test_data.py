"""Synthetic generator and public-format loaders (fixtures written here in each exact format)."""

import json
import math

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from coorkern import data  # noqa: E402
from coorkern.metrics import decode_heatmaps  # noqa: E402
from support.format_fixtures import (  # noqa: E402
    chest_fixture,
    hand_fixture,
    isbi_fixture,
    isbi_mirror_fixture,
    save_image,
    write_dicom,
    write_itk,
)


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
    assert [r.id for r in data.load_dataset("isbi2015", tmp_path, "test1", image_size=(30, 40)).records] == ["151"]
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("isbi2015", tmp_path, "test", protocol="challenge")
    with pytest.raises(ValueError, match="annotator"):
        data.load_dataset("isbi2015", tmp_path, "train", annotator="resident")


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


# ---------------------------------------------------------------------------
# The layouts people have: ISBI 2015 mirror and Payer's CSVs, hand .mha, csv conventions


def test_isbi2015_mirror_layout_senior_only(tmp_path, capsys):
    pts = isbi_mirror_fixture(tmp_path, ids=(2, 1, 3))  # rows out of order
    ds = data.load_dataset("isbi2015", tmp_path, "train", image_size=(30, 40))
    assert "annotator='senior'" in capsys.readouterr().err  # the one note: no junior annotations
    assert [r.id for r in ds.records] == ["001", "002", "003"]
    assert ds.records[0].image_path == tmp_path / "cepha400" / "001.jpg"
    expected = (torch.tensor(pts["001"]) + 0.5) * torch.tensor([40 / 50, 30 / 60]) - 0.5
    assert torch.allclose(ds[0]["landmarks"], expected.float(), atol=1e-5)
    assert torch.allclose(ds.all_landmarks()[0], expected.float(), atol=1e-5)
    assert ds[0]["spacing"].tolist() == pytest.approx([0.1 * 50 / 40, 0.1 * 60 / 30])
    # test1_senior.csv annotates image 151, which this copy lacks: an error that says so.
    with pytest.raises(data.DatasetFormatError, match=r"none of the 1 annotated images of isbi2015 split 'test1'"):
        data.load_dataset("isbi2015", tmp_path, "test1")
    with pytest.raises(data.DatasetFormatError, match="needs the junior annotations"):
        data.load_dataset("isbi2015", tmp_path, "train", annotator="mean")
    (tmp_path / "cepha400" / "002.jpg").unlink()  # one annotated image missing: skipped with a warning
    with pytest.warns(UserWarning, match=r"1 annotated image\(s\) not found .*\(002\)"):
        assert [r.id for r in data.load_dataset("isbi2015", tmp_path, "train").records] == ["001", "003"]
    with pytest.raises(data.DatasetFormatError, match=r"\(002\); strict=True"):
        data.load_dataset("isbi2015", tmp_path, "train", strict=True)


def test_isbi2015_ids_as_numbers_or_record_names(tmp_path):
    isbi_mirror_fixture(tmp_path, ids=(2, 1, 3))
    by_number = data.load_dataset("isbi2015", tmp_path, "train", image_size=(30, 40), ids=[3, 1]).records
    by_name = data.load_dataset("isbi2015", tmp_path, "train", image_size=(30, 40), ids=["003.jpg", "1"]).records
    assert [r.id for r in by_number] == [r.id for r in by_name] == ["003", "001"]
    assert np.array_equal(by_number[0].landmarks, by_name[0].landmarks)
    for bad, error, match in (([0], ValueError, "from 1 to 400, got 0"), (["x1"], TypeError, "got 'x1'"),
                              ([True], TypeError, "got True"), ("001", TypeError, "a sequence of image numbers")):
        with pytest.raises(error, match=match):
            data.load_dataset("isbi2015", tmp_path, "train", ids=bad)


def test_isbi2015_payer_csv_in_mm_mean_and_annotations_path(tmp_path):
    pts = isbi_mirror_fixture(tmp_path, junior=True)
    ds = data.load_dataset("isbi2015", tmp_path, "train", image_size=(60, 50))  # both doctors: mean by default
    junior = data.load_dataset("isbi2015", tmp_path, "train", image_size=(60, 50), annotator="junior")
    senior = data.load_dataset("isbi2015", tmp_path, "train", image_size=(60, 50), annotator="senior")
    np.testing.assert_array_equal(junior.records[0].landmarks, pts["001"] + [2.0, -2.0])  # mm * 10, exactly
    np.testing.assert_array_equal(senior.records[0].landmarks, pts["001"])
    for m, s, j in zip(ds.records, senior.records, junior.records):
        np.testing.assert_array_equal(m.landmarks, (s.landmarks + j.landmarks) / 2)
    assert "all_junior.csv, line 2" in ds.records[0].source and "train_senior.csv, line 3" in ds.records[0].source
    with pytest.raises(data.DatasetFormatError, match="needs the challenge annotations"):
        data.load_dataset("isbi2015", tmp_path, "train", annotator="challenge")
    # Payer's all_challenge.csv elsewhere, given with annotations=PATH.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "payer" / "all_junior.csv").rename(elsewhere / "all_challenge.csv")
    challenge = data.load_dataset("isbi2015", tmp_path, "train", annotator="challenge",
                                  annotations=elsewhere / "all_challenge.csv")
    np.testing.assert_array_equal(challenge.records[2].landmarks, pts["003"] + [2.0, -2.0])
    (elsewhere / "all_challenge.csv").write_text("001," + ",".join(["500"] * 38) + "\n")  # pixels without header
    with pytest.raises(data.DatasetFormatError, match=r"all_challenge\.csv, line 1: .*millimetres"):
        data.load_dataset("isbi2015", tmp_path, "train", annotator="challenge", annotations=elsewhere)
    (elsewhere / "all_challenge.csv").write_text("001,1,2\n")
    with pytest.raises(data.DatasetFormatError, match=r"all_challenge\.csv, line 1: expected 39 columns"):
        data.load_dataset("isbi2015", tmp_path, "train", annotator="challenge", annotations=elsewhere)


def test_isbi2015_layout_not_found_lists_what_was_looked_for(tmp_path):
    save_image(tmp_path / "cepha400" / "001.jpg", 20, 10)
    with pytest.raises(data.DatasetFormatError, match=r"AnnotationsByMD.*_senior\.csv.*all_senior\.csv"):
        data.load_dataset("isbi2015", tmp_path)
    (tmp_path / "train_senior.csv").write_text("image_path,1_x,1_y\n001.jpg,1,2\n")
    with pytest.raises(data.DatasetFormatError, match=r"train_senior\.csv, line 1: expected 19 landmarks"):
        data.load_dataset("isbi2015", tmp_path)


def test_hand_mha_cv_folds_missing_images_and_wrist_spacing(tmp_path):
    hand_fixture(tmp_path, n=4, suffix=".mha")
    (tmp_path / "images" / "1003.mha").unlink()  # a row of all.csv without its image, as in a full download
    for fold, train, test in ((1, ["1002", "1000"], ["1001", "1003"]), (2, ["1001"], ["1000"])):
        folder = tmp_path / "setup" / "cv" / f"set{fold}"
        folder.mkdir(parents=True)
        (folder / "train.txt").write_text("\n".join(train) + "\n")
        (folder / "test.txt").write_text("\n".join(test) + "\n")
    ds = data.load_dataset("hand", tmp_path, "train", image_size=(20, 15), cv_fold=1)
    assert [r.id for r in ds.records] == ["1002", "1000"]  # the list's order
    item = ds[1]
    assert item["image"].shape == (1, 20, 15)
    # The wrist width (50 mm over 5 px) wins over the .mha header's 0.1 mm spacing.
    assert item["spacing"].tolist() == pytest.approx([20.0, 20.0])
    with pytest.warns(UserWarning, match=r"hand: 1 annotated image\(s\) not found .*\(1003\)"):
        assert [r.id for r in data.load_dataset("hand", tmp_path, "test", cv_fold=1).records] == ["1001"]
    with pytest.raises(data.DatasetFormatError, match=r"\(1003\); strict=True"):
        data.load_dataset("hand", tmp_path, "test", cv_fold=1, strict=True)
    assert [r.id for r in data.load_dataset("hand", tmp_path, "test", cv_fold=2).records] == ["1000"]
    with pytest.raises(ValueError, match=r"must be one of \['test', 'train'\]"):
        data.load_dataset("hand", tmp_path, "val", cv_fold=2)
    with pytest.raises(data.DatasetFormatError, match=r"cv/set3 not found"):
        data.load_dataset("hand", tmp_path, "train", cv_fold=3)
    (tmp_path / "setup" / "cv" / "set2" / "test.txt").write_text("1000\n4242\n")
    with pytest.raises(data.DatasetFormatError, match=r"test\.txt: 1 id\(s\) not in .*all\.csv \(first: '4242'\)"):
        data.load_dataset("hand", tmp_path, "test", cv_fold=2)


@pytest.mark.parametrize("columns, values", [
    ("x0,y0,x1,y1", "1,2,3,4"), ("x1,y1,x2,y2", "1,2,3,4"), ("1_x,1_y,2_x,2_y", "1,2,3,4"),
    ("X_1,Y_1,X_2,Y_2", "1,2,3,4"), ("y1,y2,x1,x2", "2,4,1,3"),
])
def test_generic_csv_header_conventions(tmp_path, columns, values):
    save_image(tmp_path / "img" / "a.png", 20, 10)
    (tmp_path / "landmarks.csv").write_text(f"split,file,{columns}\ntrain,img/a.png,{values}\n")
    ds = data.load_dataset("csv", tmp_path, "train", image_size=(20, 10))
    assert ds.records[0].landmarks.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_generic_csv_finds_images_by_name_and_reads_dicom_spacing(tmp_path):
    raw = np.arange(24, dtype=np.uint16).reshape(4, 6) * 1000
    write_dicom(tmp_path / "scans" / "a.dcm", raw, pixel_spacing=(0.2, 0.3))  # rows 0.2 mm, columns 0.3 mm
    write_dicom(tmp_path / "scans" / "b", raw)  # extension-less, no spacing
    (tmp_path / "landmarks.csv").write_text("image_path,1_x,1_y\na.dcm,1,2\nscans/b,1,1\n")
    ds = data.load_dataset("csv", tmp_path / "landmarks.csv", "all", image_size=(8, 12))
    assert ds.records[0].image_path == tmp_path / "scans" / "a.dcm"  # found by name under the csv's folder
    assert ds[0]["spacing"].tolist() == pytest.approx([0.3 / 2, 0.2 / 2])  # header spacing, (x, y), resized
    assert torch.isnan(ds[1]["spacing"]).all()
    assert ds.all_landmarks()[0].tolist() == [[2.5, 4.5]]
    (tmp_path / "landmarks.csv").write_text("image_path,1_x,1_y,spacing\na.dcm,1,2,0.5\n")  # the csv's spacing wins
    assert data.load_dataset("csv", tmp_path, "all", image_size=(8, 12))[0]["spacing"].tolist() == [0.25, 0.25]
    (tmp_path / "landmarks.csv").write_text("image_path,1_x,2_y\na.dcm,1,2\n")
    with pytest.raises(data.DatasetFormatError, match=r"landmarks\.csv, line 1: landmark 1 has only one"):
        data.load_dataset("csv", tmp_path, "all")
    (tmp_path / "landmarks.csv").write_text("image_path,a,b\na.dcm,1,2\n")
    with pytest.raises(data.DatasetFormatError, match=r"landmarks\.csv, line 1: expected landmark columns"):
        data.load_dataset("csv", tmp_path, "all")


# ---------------------------------------------------------------------------
# Medical image formats (SimpleITK) and bad files


def test_dicom_rescale_monochrome_and_spacing(tmp_path):
    raw = np.array([[0, 1000, 2000], [30000, 40000, 65535]], dtype=np.uint16)
    write_dicom(tmp_path / "m2.dcm", raw, slope=2.0, intercept=-100.0, pixel_spacing=(0.2, 0.3))
    image, spacing = data.read_image_with_spacing(tmp_path / "m2.dcm")
    assert image.shape == (1, 2, 3) and image.dtype == torch.float32
    # RescaleSlope/Intercept applied, 16-bit range kept (not squeezed to 8 bits).
    assert image[0].tolist() == (raw.astype(np.float64) * 2 - 100).tolist()
    assert spacing == pytest.approx((0.3, 0.2))  # PixelSpacing lists (row, column): returned as (x, y)
    # MONOCHROME1 (high = dark) is inverted, so bright means dense as in every other format.
    write_dicom(tmp_path / "m1", raw, photometric="MONOCHROME1", slope=2.0, intercept=-100.0,
                imager_pixel_spacing=(0.15, 0.15))
    inverted, spacing = data.read_image_with_spacing(tmp_path / "m1")  # no extension: found by the DICM preamble
    assert torch.equal(inverted[0] - inverted[0, 0, 0], -2 * torch.from_numpy(raw.astype(np.float32)))
    assert spacing == pytest.approx((0.15, 0.15))  # ImagerPixelSpacing when PixelSpacing is absent
    write_dicom(tmp_path / "none.dcm", raw)
    assert data.read_image_with_spacing(tmp_path / "none.dcm")[1] is None
    assert data.image_size_of(tmp_path / "m1") == (2, 3)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_itk_formats_read_with_spacing(tmp_path, suffix):
    array = (np.arange(12).reshape(3, 4) * 5000).astype(np.uint16)
    write_itk(tmp_path / f"x{suffix}", array, spacing=(0.5, 0.25))
    image, spacing = data.read_image_with_spacing(tmp_path / f"x{suffix}")
    assert image[0].tolist() == array.astype(np.float32).tolist()
    assert spacing == pytest.approx((0.5, 0.25))
    assert data.image_size_of(tmp_path / f"x{suffix}") == (3, 4)
    write_itk(tmp_path / f"y{suffix}", array[None].astype(np.uint8), spacing=(0.5, 0.25))  # one slice, 8 bit
    assert data.read_image(tmp_path / f"y{suffix}")[0].tolist() == (array.astype(np.uint8) / 255).astype(
        np.float32).tolist()


def test_metaimage_without_spacing_has_none(tmp_path):
    header = "ObjectType = Image\nNDims = 2\nDimSize = 2 1\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    (tmp_path / "x.mha").write_bytes(header.encode() + bytes([0, 255]))
    image, spacing = data.read_image_with_spacing(tmp_path / "x.mha")
    assert image[0].tolist() == [[0.0, 1.0]] and spacing is None


def test_bad_image_files_name_the_file(tmp_path):
    save_image(tmp_path / "ok.jpg", 64, 64)
    jpeg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    write_itk(tmp_path / "ok.mha", np.zeros((3, 4), np.uint16))
    (tmp_path / "short.mha").write_bytes((tmp_path / "ok.mha").read_bytes()[:-5])
    write_itk(tmp_path / "volume.mha", np.zeros((2, 3, 4), np.uint8))
    write_dicom(tmp_path / "nopixels.dcm", np.zeros((3, 4)), pixels=False)
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 50)
    (tmp_path / "garbage").write_bytes(b"neither an image nor DICOM")
    cases = {"truncated.jpg": "cannot read image", "short.mha": "cannot read image",
             "volume.mha": "expected a 2-D image", "nopixels.dcm": "cannot read image",
             "garbage.dcm": "cannot read image", "garbage": "cannot read image", "gone.nrrd": "image file not found"}
    for name, message in cases.items():
        with pytest.raises(data.DatasetFormatError, match=rf"{name}: {message}"):
            data.read_image(tmp_path / name)
