"""Honest model selection: real data select the checkpoint on a part carved from the training split (disjoint
from the reported test split), select-on-test is named, and the cpu profile's budget of images gives the epochs."""

import json
import math

import pytest
import torch

from coorkern import data, evaluate, train
from coorkern.engine import profiles, splits, studies
from support.format_fixtures import hand_fixture, isbi_fixture

pytest.importorskip("PIL.Image")

TINY = ["--image-size", "64", "64", "--batch-size", "1", "--base-channels", "2", "--heads", "2", "2", "1", "1",
        "--no-progress", "--threads", "1", "--overlays", "0", "--epochs", "1"]


def csv_fixture(root, count=10):
    """``count`` PNGs + ``landmarks.csv`` without a split column: the first 80% train, the rest test."""
    from PIL import Image

    images, landmarks = data.render_synthetic(list(range(count)), (64, 64))
    rows = ["image,x0,y0,x1,y1,spacing"]
    for i in range(count):
        Image.fromarray((images[i, 0] * 255).clamp(0, 255).byte().numpy()).save(root / f"{i}.png")
        rows.append(f"{i}.png," + ",".join(f"{v:.2f}" for v in landmarks[i, :2].reshape(-1).tolist()) + ",0.5")
    (root / "landmarks.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    root = csv_fixture(tmp_path_factory.mktemp("csv"))
    return root, train.main(TINY + ["--data", "csv", "--root", str(root), "--out", str(root / "run")])


def test_real_data_select_on_a_carved_part_disjoint_from_the_test_split(csv_run):
    root, result = csv_run
    args, chosen = result["config"]["args"], result["config"]["splits"]
    assert (args["train_split"], args["val_split"], args["test_split"]) == ("train", "carved", "test")
    # 10 images: 8 train (of which the last 10%, one, validates) and 2 test.
    assert chosen["val"]["ids"] == ["7"] and chosen["val"]["from"] == "train"
    assert (chosen["train"]["images"], chosen["val"]["images"], chosen["test"]["images"]) == (7, 1, 2)
    test_ids = {r.id for r in data.load_dataset("csv", root, "test", (64, 64)).records}
    train_ids = {r.id for r in data.load_dataset("csv", root, "train", (64, 64)).records} - set(chosen["val"]["ids"])
    assert test_ids == {"8", "9"} and not test_ids & set(chosen["val"]["ids"]) and not train_ids & {"7"}
    report = json.loads((result["run_dir"] / "test_metrics.json").read_text())
    assert report["selection"].startswith("carved: the last 10%") and "optimistic" not in report["selection"]
    calibration = torch.load(result["run_dir"] / "checkpoint_best.pt", weights_only=True)["conformal"]
    assert calibration["split"] == "carved" and calibration["count"] == [1, 1]


def test_evaluate_can_measure_the_carved_part_again(csv_run, tmp_path):
    root, result = csv_run
    report = evaluate.main(["--checkpoint", str(result["run_dir"]), "--split", "carved", "--out",
                            str(tmp_path / "val"), "--overlays", "0"])
    assert report["split"] == "carved" and [p["id"] for p in report["predictions"]] == ["7"]
    assert report["selection"].startswith("carved")


def test_select_on_test_stays_available_and_is_named(tmp_path, capsys):
    root = csv_fixture(tmp_path)
    result = train.main(TINY + ["--data", "csv", "--root", str(root), "--val-split", "test", "--out",
                                str(tmp_path / "run")])
    assert "optimistic" in capsys.readouterr().out
    report = json.loads((result["run_dir"] / "test_metrics.json").read_text())
    assert report["selection"] == "test (optimistic)" and result["selection"] == "test (optimistic)"
    assert result["config"]["splits"]["val"] == {"split": "test", "images": 2}


def test_hand_data_carve_by_the_same_rule(tmp_path):
    hand_fixture(tmp_path / "hand", n=6, size=(80, 64))
    result = train.main(TINY + ["--data", "hand", "--root", str(tmp_path / "hand"), "--out", str(tmp_path / "run")])
    chosen = result["config"]["splits"]
    # 609/909 of 6 rows train (4): one carved (at least one), 3 train; 2 test.
    assert chosen["val"]["ids"] == ["1003"] and chosen["train"]["images"] == 3 and chosen["test"]["images"] == 2


def test_isbi2015_paper_protocol_validates_on_136_to_150(tmp_path):
    isbi_fixture(tmp_path, ids=range(1, 151), size=(20, 16))
    train_set = data.load_dataset("isbi2015", tmp_path, "train", (32, 32))
    trained, validated, rule = splits.carve_validation(train_set, 0.1, "isbi2015", tmp_path)
    assert [r.id for r in validated.records] == [f"{i:03d}" for i in range(136, 151)]
    assert [r.id for r in trained.records] == [f"{i:03d}" for i in range(1, 136)]
    assert validated.augment is None and "15" in rule
    assert splits.default_splits("isbi2015") == ("train", "carved", "test")
    assert splits.default_splits("isbi2015", protocol="challenge") == ("train", "test1", "test2")
    assert splits.default_splits("synthetic") == ("train", "val", "test")
    with pytest.raises(ValueError, match="leaves none"):
        splits.carve_validation(data.load_dataset("isbi2015", tmp_path, "train", (32, 32), ids=[1]), 0.1,
                                "isbi2015")


def test_the_experiments_isbi_holdout_lists_train_val_and_test_ids(tmp_path):
    from coorkern import experiments

    isbi_fixture(tmp_path / "isbi", ids=range(1, 151), size=(20, 16))
    args = experiments.build_parser().parse_args(["--study", "loss", "--data", "isbi2015", "--root",
                                                  str(tmp_path / "isbi"), "--profile", "cpu", "--out",
                                                  str(tmp_path)])
    common = studies.common_train_args(args)
    assert common[common.index("--val-split") + 1] == "val"
    table = tmp_path / "isbi2015_holdout.csv"
    ids = {split: [r.id for r in data.load_dataset("csv", table, split, (32, 32)).records]
           for split in ("train", "val", "test")}
    assert ids == {"train": [f"{i:03d}" for i in range(1, 86)], "val": [f"{i:03d}" for i in range(86, 101)],
                   "test": [f"{i:03d}" for i in range(101, 151)]}
    assert studies.ISBI_HOLDOUT == {"train": list(range(1, 86)), "val": list(range(86, 101)),
                                    "test": list(range(101, 151))}


def test_the_cpu_profile_budget_gives_the_epochs(tmp_path, capsys):
    assert profiles.budget_epochs(6000, 85) == 71 and profiles.budget_epochs(6000, 100) == 60
    assert profiles.budget_epochs(6000, 548) == math.ceil(6000 / 548) == 11
    with pytest.raises(ValueError):
        profiles.budget_epochs(6000, 0)
    root = csv_fixture(tmp_path)
    argv = TINY[:-2]  # without --epochs
    assert "--epochs" not in argv
    # The profile's budget, smaller: 7 training images (8 less the carved one) -> ceil(15 / 7) = 3 epochs.
    result = train.main(argv + ["--data", "csv", "--root", str(root), "--profile", "cpu", "--train-images", "15",
                                "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "15 training images seen" in out and "-> 3 epochs (ceil)" in out
    assert len(result["history"]) == 3 and result["config"]["args"]["epochs"] == 3
    assert result["config"]["budget"] == {"train_images": 15, "train_split_images": 7, "epochs": 3}
    # --epochs wins over the budget.
    again = train.main(argv + ["--data", "csv", "--root", str(root), "--profile", "cpu", "--train-images", "15",
                               "--epochs", "1", "--out", str(tmp_path / "run2")])
    assert len(again["history"]) == 1 and again["config"]["budget"] is None
