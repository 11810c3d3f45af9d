"""AASCE 2019 / BoostNet spine loader: fixtures in the distributed layout, and the real copy where present."""

import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("scipy.io")
pytest.importorskip("PIL.Image")

from coorkern import data  # noqa: E402
from coorkern.data import spine as spine_mod  # noqa: E402
from support.paths import REALDATA  # noqa: E402
from support.spine_fixtures import aasce_names, spine_fixture  # noqa: E402

SPINE = REALDATA / "spine"
NAMES = ["sunhl-1th-02-Jan-2017-162 A AP.jpg", "sunhl-1th-02-Jan-2017-162 a ap.jpg",
         "sunhl-1th-22-Nov-2016-142 A AP (2).jpg"]


def _stem(name):
    return name[: -len(".jpg")]


def _labels(root, folder="training"):
    return root / "labels" / folder


# ---------------------------------------------------------------------------
# Fixtures in the distributed layout


def _records_fail(root, pattern):
    """``spine_records(root, "train")`` raises a DatasetFormatError matching ``pattern``."""
    with pytest.raises(data.DatasetFormatError, match=pattern):
        data.spine_records(root, "train")


@pytest.mark.parametrize("with_csv", [True, False], ids=["mat+csv", "mat-only"])
def test_spine_records_from_mat_files_with_or_without_landmarks_csv(tmp_path, with_csv):
    truth = spine_fixture(tmp_path, NAMES, csv=with_csv)
    ds = data.load_dataset("spine", tmp_path, "train", image_size=(40, 16))
    assert ds.thresholds == data.DEFAULT_THRESHOLDS["spine"] == spine_mod.SPINE_THRESHOLDS
    assert [r.id for r in ds.records] == [_stem(n) for n in NAMES]  # spaces and case kept, in row order
    for rec, name in zip(ds.records, NAMES):
        points, size, angles = truth[name]
        assert isinstance(rec, data.SpineRecord)
        assert rec.image_path == tmp_path / "data" / "training" / name
        assert rec.landmarks.dtype == np.float64 and rec.landmarks.shape == (68, 2)
        np.testing.assert_array_equal(rec.landmarks, points)
        assert all(math.isnan(s) for s in rec.spacing)  # no spacing invented
        np.testing.assert_allclose(rec.angles, angles)
        assert rec.original_size == size and rec.image_height == size[0]
    item = ds[0]
    assert item["image"].shape == (1, 40, 16)
    assert torch.isnan(item["spacing"]).all()
    h, w = truth[NAMES[0]][1]
    expected = (torch.as_tensor(truth[NAMES[0]][0]) + 0.5) * torch.tensor([16 / w, 40 / h]) - 0.5
    assert torch.allclose(item["landmarks"].double(), expected, atol=1e-5)
    labels = data.spine_angles(tmp_path, "train")
    assert list(labels) == [_stem(n) for n in NAMES]
    np.testing.assert_allclose(labels[_stem(NAMES[1])][0], truth[NAMES[1]][2])
    assert labels[_stem(NAMES[1])][1] == truth[NAMES[1]][1][0]


def test_spine_without_angles_csv_has_nan_angles_and_root_may_be_one_folder_up(tmp_path):
    spine_fixture(tmp_path / "boostnet", NAMES[:2], angles=False)
    records = data.spine_records(tmp_path, "train")
    assert [r.id for r in records] == [_stem(n) for n in NAMES[:2]]
    assert all(np.isnan(r.angles).all() and r.angles.shape == (3,) for r in records)


def test_spine_csv_that_disagrees_with_the_mat_file_names_file_and_row(tmp_path):
    truth = spine_fixture(tmp_path, NAMES)
    table = _labels(tmp_path) / "landmarks.csv"
    rows = table.read_text().splitlines()
    cells = rows[1].split(",")
    w = truth[NAMES[1]][1][1]
    cells[4] = f"{float(cells[4]) + 1.5 / w:.6g}"  # landmark 5's x moved by 1.5 px
    rows[1] = ",".join(cells)
    table.write_text("\n".join(rows) + "\n")
    with pytest.raises(data.DatasetFormatError, match=r"landmarks\.csv, line 2: landmark 5 of "
                                                      r"'sunhl-1th-02-Jan-2017-162 a ap\.jpg'.*more than 1 px"):
        data.spine_records(tmp_path, "train")
    cells[4] = f"{float(cells[4]) - 1.0 / w:.6g}"  # 0.5 px: within the tolerance
    rows[1] = ",".join(cells)
    table.write_text("\n".join(rows) + "\n")
    assert len(data.spine_records(tmp_path, "train")) == 3


@pytest.mark.parametrize("csv_name, count", [("landmarks.csv", 136), ("angles.csv", 3)])
def test_spine_truncated_csv_row_names_file_and_row(tmp_path, csv_name, count):
    spine_fixture(tmp_path, NAMES)
    table = _labels(tmp_path) / csv_name
    rows = table.read_text().splitlines()
    rows[2] = rows[2].rsplit(",", 1)[0]
    table.write_text("\n".join(rows) + "\n")
    with pytest.raises(data.DatasetFormatError,
                       match=rf"{re.escape(csv_name)}, line 3: expected {count} numbers .* got {count - 1}"):
        data.spine_records(tmp_path, "train")
    rows[2] = ",".join(["1"] * (count - 1) + [""])
    table.write_text("\n".join(rows) + "\n")
    _records_fail(tmp_path, rf"{re.escape(csv_name)}, line 3: missing or non-finite")


@pytest.mark.parametrize("csv_name", ["landmarks.csv", "angles.csv"])
def test_spine_csv_with_fewer_or_more_rows_than_filenames(tmp_path, csv_name):
    spine_fixture(tmp_path, NAMES)
    table = _labels(tmp_path) / csv_name
    rows = table.read_text().splitlines()
    table.write_text("\n".join(rows[:2]) + "\n")
    with pytest.raises(data.DatasetFormatError, match=rf"{re.escape(csv_name)}, line 3: has 2 rows but "
                                                      r"filenames\.csv names 3 images \(row 3 is missing\)"):
        data.spine_records(tmp_path, "train")
    table.write_text("\n".join(rows + [rows[0]]) + "\n")
    _records_fail(tmp_path, r"row 4 has no image")


def test_spine_mat_file_missing_truncated_or_of_the_wrong_shape(tmp_path):
    import scipy.io

    spine_fixture(tmp_path, NAMES)
    mat = _labels(tmp_path) / f"{NAMES[1]}.mat"
    where = re.escape(f"{mat} (row 2 of {_labels(tmp_path) / 'filenames.csv'})")
    for p2, problem in ((np.zeros((68, 3)), r"shape \(68, 3\)"), (np.zeros((17, 2)), r"shape \(17, 2\)"),
                        (np.zeros((2, 68)), r"shape \(2, 68\)")):
        scipy.io.savemat(str(mat), {"p2": p2})
        _records_fail(tmp_path, rf"{where}: 'p2' must be a 68 x 2 .*{problem}")
    scipy.io.savemat(str(mat), {"pts": np.zeros((68, 2))})
    _records_fail(tmp_path, rf"{where}: no array 'p2' \(found \['pts'\]\)")
    scipy.io.savemat(str(mat), {"p2": np.zeros((68, 2))})
    mat.write_bytes(mat.read_bytes()[:150])  # truncated
    _records_fail(tmp_path, rf"{where}: cannot read the MATLAB file")
    mat.write_bytes(b"not a MATLAB file at all")
    _records_fail(tmp_path, rf"{where}: cannot read the MATLAB file")
    mat.unlink()
    for landmarks_csv in (True, False):  # the .mat file is required even where landmarks.csv has the row
        if not landmarks_csv:
            (_labels(tmp_path) / "landmarks.csv").unlink()
        _records_fail(tmp_path, rf"{where}: landmark file not found")


def test_spine_row_without_an_image_warns_or_raises_with_strict(tmp_path):
    spine_fixture(tmp_path, NAMES, images={NAMES[0], NAMES[2]})
    with pytest.warns(UserWarning, match=r"spine: 1 annotated image\(s\) not found .*"
                                         r"\(sunhl-1th-02-Jan-2017-162 a ap\.jpg\); skipped"):
        ds = data.load_dataset("spine", tmp_path, "train", image_size=(40, 16))
    assert [r.id for r in ds.records] == [_stem(NAMES[0]), _stem(NAMES[2])]
    with pytest.raises(data.DatasetFormatError, match=r"\(sunhl-1th-02-Jan-2017-162 a ap\.jpg\); strict=True"):
        data.load_dataset("spine", tmp_path, "train", strict=True)


def test_spine_images_converted_to_another_format_are_found_by_stem(tmp_path):
    spine_fixture(tmp_path, NAMES[:2])
    image = tmp_path / "data" / "training" / NAMES[1]
    from PIL import Image

    Image.open(image).save(image.with_suffix(".png"))
    image.unlink()
    records = data.spine_records(tmp_path, "train")
    assert records[1].image_path == image.with_suffix(".png")


def test_spine_filenames_csv_errors(tmp_path):
    spine_fixture(tmp_path, NAMES)
    names = _labels(tmp_path) / "filenames.csv"
    names.write_text(f"{NAMES[0]}\n\n{NAMES[1]}\n{NAMES[2]}\n")
    _records_fail(tmp_path, r"filenames\.csv, line 2: empty line")
    names.write_text(f"{NAMES[0]}\n{NAMES[1]}\n{NAMES[0]}\n")
    _records_fail(tmp_path, r"filenames\.csv, line 3: image .* listed twice")
    names.unlink()
    _records_fail(tmp_path, r"filenames\.csv: annotation file not found")


def test_spine_splits_train_test_and_unknown(tmp_path):
    spine_fixture(tmp_path, NAMES[:2])
    with pytest.raises(data.DatasetFormatError, match=r"labels[/\\]test: spine 'test' split needs this folder"):
        data.load_dataset("spine", tmp_path, "test")
    spine_fixture(tmp_path, ["sunhl-1th-01-Feb-2017-500 A AP.jpg"], folder="test", images=set())
    with pytest.raises(data.DatasetFormatError, match=r"data[/\\]test: spine 'test' split needs this folder"):
        data.load_dataset("spine", tmp_path, "test")
    spine_fixture(tmp_path, ["sunhl-1th-01-Feb-2017-500 A AP.jpg"], folder="test")
    test = data.load_dataset("spine", tmp_path, "test", image_size=(40, 16))
    train = data.load_dataset("spine", tmp_path, "train", image_size=(40, 16))
    assert [r.id for r in test.records] == ["sunhl-1th-01-Feb-2017-500 A AP"]
    assert [r.id for r in train.records] == [_stem(n) for n in NAMES[:2]]
    with pytest.raises(ValueError, match=r"spine split must be one of .*'holdout_val'.* got 'val'"):
        data.load_dataset("spine", tmp_path, "val")
    with pytest.raises(data.DatasetFormatError, match=r"spine labels folder not found"):
        data.spine_records(tmp_path / "data", "train")


def test_spine_holdout_rows_are_a_fixed_disjoint_cover_of_481_rows():
    rows = {part: [r for a, b in ranges for r in range(a, b)] for part, ranges in data.SPINE_HOLDOUT_ROWS.items()}
    assert {p: len(r) for p, r in rows.items()} == {"holdout_train": 361, "holdout_val": 40, "holdout_test": 80}
    assert sorted(r for part in rows.values() for r in part) == list(range(481))
    assert rows["holdout_val"][:2] == [269, 360] and rows["holdout_test"][:2] == [340, 402]
    assert data.SPINE_SPLITS == ("train", "test", "holdout_train", "holdout_val", "holdout_test")


def test_spine_holdout_split_on_a_481_row_copy(tmp_path):
    names = aasce_names(481)
    val = {names[r] for r in [269] + list(range(360, 399))}
    spine_fixture(tmp_path, names, images=val)  # images only for the val part: the others are never looked at
    parts = data.spine_holdout_split(tmp_path)
    assert {p: len(v) for p, v in parts.items()} == {"holdout_train": 361, "holdout_val": 40, "holdout_test": 80}
    assert set(parts["holdout_val"]) == val
    assert sorted(sum(parts.values(), [])) == sorted(names)
    ds = data.load_dataset("spine", tmp_path, "holdout_val", image_size=(40, 16))
    assert [r.id for r in ds.records] == [_stem(n) for n in parts["holdout_val"]]
    with pytest.warns(UserWarning, match=r"80 annotated image\(s\) not found"):
        with pytest.raises(data.DatasetFormatError, match="no annotated images found"):
            data.load_dataset("spine", tmp_path, "holdout_test")


def test_spine_holdout_needs_the_481_rows(tmp_path):
    spine_fixture(tmp_path, NAMES)
    with pytest.raises(data.DatasetFormatError, match=r"filenames\.csv: the spine holdout split is defined on the "
                                                      r"481 rows .* this one has 3"):
        data.load_dataset("spine", tmp_path, "holdout_train")
    with pytest.raises(data.DatasetFormatError, match="481 rows"):
        data.spine_holdout_split(tmp_path)


def test_spine_is_registered():
    assert "spine" in data.DATASETS
    h, w = data.DEFAULT_IMAGE_SIZE["spine"]
    assert h > 2 * w
    assert data.DEFAULT_THRESHOLDS["spine"] == (10.0, 20.0, 30.0, 40.0)


# ---------------------------------------------------------------------------
# The real copy (../shared/realdata/spine), skipped when absent

real = pytest.mark.skipif(not SPINE.is_dir(), reason=f"{SPINE} not present")


@real
def test_real_spine_training_records_and_check_values():
    records = data.spine_records(SPINE, "train")
    assert len(records) == 481
    first = records[0]
    assert first.id == "sunhl-1th-02-Jan-2017-162 A AP"
    assert first.image_path.name == "sunhl-1th-02-Jan-2017-162 A AP.jpg"
    assert first.original_size == (2125, 755) == data.image_size_of(first.image_path)
    assert first.landmarks[0].tolist() == [361.0, 72.0]
    np.testing.assert_allclose(first.angles, [41.139, 14.63, 40.147])
    assert all(math.isnan(s) for r in records for s in r.spacing)
    assert all(r.landmarks.shape == (68, 2) and np.isfinite(r.angles).all() for r in records)


@real
def test_real_spine_item_and_missing_test_folder():
    ds = data.load_dataset("spine", SPINE, "holdout_val")
    assert len(ds) == 40 and ds.records[0].id == "sunhl-1th-21-Jul-2016-15 E AP"
    item = ds[0]
    assert item["image"].shape == (1, *data.DEFAULT_IMAGE_SIZE["spine"])
    assert torch.isnan(item["spacing"]).all()
    with pytest.raises(data.DatasetFormatError, match=r"test: spine 'test' split needs this folder"):
        data.load_dataset("spine", SPINE, "test")


@real
def test_real_spine_holdout_keeps_each_case_in_one_part():
    parts = data.spine_holdout_split(SPINE)
    assert {p: len(v) for p, v in parts.items()} == {"holdout_train": 361, "holdout_val": 40, "holdout_test": 80}
    names = (SPINE / "labels" / "training" / "filenames.csv").read_text().split("\n")[:481]
    assert sorted(sum(parts.values(), [])) == sorted(names)

    def case(name):  # the number before the image letter; the 17 "coronal<k>" images count as one case
        m = re.search(r"-(\d+) [A-Za-z]+ ", name)
        return m.group(1) if m else "coronal" if "coronal" in name else name

    cases = {p: {case(n) for n in v} for p, v in parts.items()}
    assert not cases["holdout_train"] & cases["holdout_val"]
    assert not cases["holdout_train"] & cases["holdout_test"]
    assert not cases["holdout_val"] & cases["holdout_test"]

