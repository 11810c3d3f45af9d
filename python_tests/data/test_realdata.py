"""Real radiographs: the ISBI 2015 mirror + Payer's CSVs and the hand atlas .mha files in ../shared/realdata.

Skipped when that folder is absent (it is never part of the repository).  Reading the
150 full-size JPEGs takes seconds, so the index (annotations + image headers) is checked
for all of them and only a few images are decoded.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from coorkern import data, predict, train
from support.paths import REALDATA as REALDATA_DIR

REALDATA = REALDATA_DIR
ISBI = REALDATA / "isbi2015"
HAND = REALDATA / "hand"
SIZE = (240, 194)  # (H, W): a tenth of the ISBI images
pytestmark = pytest.mark.skipif(not ISBI.is_dir() or not HAND.is_dir(), reason=f"{REALDATA} not present")


def _payer_pixels(name: str) -> dict[int, np.ndarray]:
    table = np.loadtxt(ISBI / "payer" / name, delimiter=",")
    return {int(row[0]): np.round(row[1:].reshape(-1, 2) * 10, 6) for row in table}


def _expected_on_grid(points, original_hw, size=SIZE):
    (oh, ow), (h, w) = original_hw, size
    return (torch.as_tensor(points, dtype=torch.float64) + 0.5) * torch.tensor([w / ow, h / oh]) - 0.5


def test_isbi2015_mirror_loads_the_150_training_images():
    ds = data.load_dataset("isbi2015", ISBI, "train", image_size=SIZE, annotator="senior")
    assert [r.id for r in ds.records] == [f"{n:03d}" for n in range(1, 151)]
    assert all(r.image_path.parent.name == "cepha400" for r in ds.records)
    assert ds.records[0].landmarks[0].tolist() == [835.0, 996.0]  # the README's check value
    assert data.image_size_of(ds.records[0].image_path) == (2400, 1935)
    grid = ds.all_landmarks()  # every image's header, no decoding
    assert grid.shape == (150, 19, 2)
    assert torch.allclose(grid[0, 0].double(), _expected_on_grid([835.0, 996.0], (2400, 1935)), atol=1e-4)
    item = ds[0]
    assert item["image"].shape == (1, *SIZE)
    assert torch.equal(item["landmarks"], grid[0])
    assert item["spacing"].tolist() == pytest.approx([0.1 * 1935 / 194, 0.1 * 2400 / 240])
    with pytest.raises(data.DatasetFormatError, match="none of the 250 annotated images"):
        data.load_dataset("isbi2015", ISBI, "test")  # the mirror's test images are not in this copy


def test_isbi2015_mean_of_the_two_doctors():
    mean = data.load_dataset("isbi2015", ISBI, "train", image_size=SIZE)  # both doctors present: mean
    senior = data.load_dataset("isbi2015", ISBI, "train", image_size=SIZE, annotator="senior")
    junior = data.load_dataset("isbi2015", ISBI, "train", image_size=SIZE, annotator="junior")
    payer_senior = _payer_pixels("all_senior.csv")
    payer_junior = _payer_pixels("all_junior.csv")
    for m, s, j in zip(mean.records, senior.records, junior.records):
        np.testing.assert_array_equal(s.landmarks, payer_senior[int(s.id)])  # mirror CSV == Payer's mm x 10
        np.testing.assert_array_equal(j.landmarks, payer_junior[int(j.id)])
        np.testing.assert_array_equal(m.landmarks, (s.landmarks + j.landmarks) / 2)
    distance_mm = np.mean([np.linalg.norm(s.landmarks - j.landmarks, axis=1).mean() * 0.1
                           for s, j in zip(senior.records, junior.records)])
    assert 1.0 < distance_mm < 4.0  # the doctors disagree by ~2 mm (2.15 mm over all 400 images)


def test_isbi2015_original_layout_gives_identical_landmarks(tmp_path):
    from PIL import Image

    ids = (1, 2, 150)
    for who in ("senior", "junior"):
        table = _payer_pixels(f"all_{who}.csv")
        folder = tmp_path / "AnnotationsByMD" / f"400_{who}"
        folder.mkdir(parents=True)
        for n in ids:
            lines = [f"{x:g},{y:g}" for x, y in table[n]] + ["2", "1", "3", "1"]  # + the classification lines
            (folder / f"{n:03d}.txt").write_text("\n".join(lines) + "\n")
    for n in ids:
        target = tmp_path / "RawImage" / ("TrainingData" if n <= 150 else "Test1Data") / f"{n:03d}.bmp"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(ISBI / "cepha400" / f"{n:03d}.jpg") as img:
            img.convert("L").save(target)  # 8-bit BMP, as the challenge distributed them
    original = data.load_dataset("isbi2015", tmp_path, "train", image_size=SIZE)
    mirror = data.load_dataset("isbi2015", ISBI, "train", image_size=SIZE, ids=ids)
    assert [r.id for r in original.records] == ["001", "002", "150"]
    assert original.records[0].image_path.suffix == ".bmp"
    for a, b in zip(original.records, mirror.records):
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
    assert torch.equal(original.all_landmarks(), mirror.all_landmarks())
    first, again = original[0], mirror[0]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["landmarks"], again["landmarks"])


def _mha_size(path: Path) -> tuple[int, int]:
    """(H, W) from the MetaImage header text (``DimSize = W H 1``), independent of SimpleITK."""
    for line in path.read_bytes()[:2048].decode("latin-1").splitlines():
        if line.startswith("DimSize"):
            w, h = (int(v) for v in line.split("=")[1].split()[:2])
            return h, w
    raise AssertionError(f"{path}: no DimSize")


def test_hand_mha_images_points_and_wrist_spacing():
    with pytest.warns(UserWarning, match=r"hand: 901 annotated image\(s\) not found"):
        ds = data.load_dataset("hand", HAND, "all", image_size=(256, 192))
    assert sorted(r.id for r in ds.records) == ["3167", "3177", "3229", "3231", "5245", "7081", "7088", "7232",
                                                "7236"]
    for rec in ds.records:
        h, w = data.image_size_of(rec.image_path)
        assert (h, w) == _mha_size(rec.image_path)
        assert rec.landmarks.shape == (37, 2)
        assert ((rec.landmarks >= 0) & (rec.landmarks <= [w - 1, h - 1])).all(), rec.id
    rec = ds.records[0]
    image = data.read_image(rec.image_path)
    assert tuple(image.shape) == (1, *_mha_size(rec.image_path))
    assert 0 <= float(image.min()) < float(image.max()) <= 1  # 8-bit, scaled like a JPEG
    item = ds[0]
    oh, ow = image.shape[-2:]
    mm_per_px = 50.0 / np.linalg.norm(rec.landmarks[1] - rec.landmarks[5])
    assert 0.05 < mm_per_px < 0.2  # a plausible hand radiograph (the header says 0.108, and is ignored)
    assert item["spacing"].tolist() == pytest.approx([mm_per_px * ow / 192, mm_per_px * oh / 256], rel=1e-5)
    with pytest.raises(data.DatasetFormatError, match="strict=True"):
        data.load_dataset("hand", HAND, "all", strict=True)


def test_hand_published_cross_validation_folds():
    for fold in (1, 2, 3):
        with pytest.warns(UserWarning, match="not found"):
            train = data.load_dataset("hand", HAND, "train", image_size=(64, 48), cv_fold=fold)
            test = data.load_dataset("hand", HAND, "test", image_size=(64, 48), cv_fold=fold)
        listed = (HAND / "setup" / "cv" / f"set{fold}" / "test.txt").read_text().split()
        assert {r.id for r in test.records} == {i for i in listed if (HAND / "images" / f"{i}.mha").is_file()}
        assert not {r.id for r in train.records} & {r.id for r in test.records}


def test_real_radiographs_through_training_and_prediction(tmp_path):
    """The detector end to end on real files: one epoch on 4 ISBI cephalograms (CSV of the
    loader's mean-of-both-doctors landmarks), then ``predict`` on a held-out JPEG and a hand
    MetaImage, each mapped back to its own full-size pixels (and to mm where the file has a spacing)."""
    ids = ["001", "002", "003", "004", "005"]
    records = data.load_dataset("isbi2015", ISBI, "train", image_size=SIZE, ids=ids).records
    lines = ["image," + ",".join(f"x{j},y{j}" for j in range(19)) + ",spacing_x,spacing_y,split"]
    for i, rec in enumerate(records):
        coords = ",".join(f"{v:.2f}" for v in np.asarray(rec.landmarks, dtype=float).reshape(-1))
        lines.append(f"{rec.image_path},{coords},0.1,0.1,{'train' if i < 4 else 'test'}")
    (tmp_path / "isbi.csv").write_text("\n".join(lines) + "\n")
    run = train.main(["--data", "csv", "--root", str(tmp_path / "isbi.csv"), "--image-size", "64", "52",
                      "--batch-size", "2", "--epochs", "1", "--base-channels", "4", "--transformer", "coor",
                      "--no-progress", "--threads", "1", "--overlays", "0", "--out", str(tmp_path / "run")])
    assert np.isfinite(run["history"][-1]["train_loss"])
    hand_image = sorted((HAND / "images").glob("*.mha"))[0]
    entries = predict.main(["--checkpoint", str(tmp_path / "run"), str(records[4].image_path), str(hand_image),
                            "--out", str(tmp_path / "pred"), "--no-overlay", "--no-progress"])
    assert [Path(e["image"]).name for e in entries] == ["005.jpg", hand_image.name]
    for entry, size in zip(entries, [(2400, 1935), data.image_size_of(hand_image)]):
        assert entry["image_size"] == list(size)
        coords = torch.tensor(entry["landmarks_px"])
        assert coords.shape == (19, 2) and torch.isfinite(coords).all()
        assert (coords >= -0.5).all()
        assert (coords[:, 0] <= size[1] - 0.5).all() and (coords[:, 1] <= size[0] - 0.5).all()
    # A JPEG has no spacing: the training images' common 0.1 mm (from the CSV) applies; the
    # MetaImage's header gives its own.
    assert entries[0]["spacing_source"] == "the training images' spacing" and entries[0]["spacing_mm"] == [0.1, 0.1]
    assert entries[1]["spacing_source"] == "image header" and entries[1]["spacing_mm"][0] > 0
    for entry in entries:
        mm = torch.tensor(entry["landmarks_mm"])
        torch.testing.assert_close(mm, torch.tensor(entry["landmarks_px"]) * torch.tensor(entry["spacing_mm"]),
                                   atol=1e-3, rtol=0)
