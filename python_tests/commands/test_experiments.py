"""``python -m coorkern.experiments``: a tiny synthetic study end to end, resume, bad arguments.

The study trains real (tiny: 64x64, base width 2, 2 epochs, 8 training images) runs through
``python -m coorkern.train`` subprocesses, two at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coorkern import experiments, train
from coorkern.engine import studies, study_report
from support.paths import REALDATA as REALDATA_DIR


TINY_TRAIN = ("--train-samples 8 --val-samples 4 --test-samples 6 --batch-size 4 --base-channels 2 "
              "--heads 2 2 1 1 --lr 3e-3")


def study_args(out, variants="bce,central"):
    return ["--study", "loss", "--variants", variants, "--seeds", "1", "--epochs", "2", "--image-size", "64", "64",
            "--jobs", "2", "--threads", "2", "--out", str(out), "--train-args", TINY_TRAIN]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, experiments.main(study_args(out))


def test_tiny_study_writes_the_report(tiny_study):
    out, result = tiny_study
    assert not result["failed"] and len(result["launched"]) == 2
    study = result["report"]["studies"]["loss"]
    assert study["reference"] == "central" and set(study["variants"]) == {"bce", "central"}
    bce, central = study["variants"]["bce"], study["variants"]["central"]
    for row in (bce, central):
        assert row["seeds"] == [0] and row["mre"]["mean"] > 0 and len(row["per_image_mre"]) == 6
        assert set(row["sdr"]) == {"2", "2.5", "3", "4"} and len(row["val_loss"]) == 2
        assert row["wall_s"]["mean"] > 0 and row["images_per_s"]["mean"] > 0
    assert central["p_value"] is None and 0 < bce["p_value"] <= 1
    text = (out / "report.md").read_text()
    assert "| variant | seeds | MRE (mm) | SDR 2 mm (%)" in text
    assert "| central (ref.) | 1 |" in text and f"| bce | 1 | {bce['mre']['mean']:.2f} |" in text
    assert study_report.format_p(bce["p_value"]) in text
    for name in ("loss_mre_boxplot.png", "loss_val_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    saved = json.loads((out / "report.json").read_text())
    assert saved["studies"]["loss"]["variants"]["bce"]["p_value"] == bce["p_value"]
    config = json.loads((out / "runs" / "none-bce" / "seed0" / "config.json").read_text())
    assert config["args"]["loss"] == "bce" and config["args"]["transformer"] == "none"
    assert config["data_options"]["seed"] == 0 and config["args"]["seed"] == 0  # same images for every seed


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(tiny_study):
    out, _ = tiny_study
    finished = out / "runs" / "none-bce" / "seed0" / "checkpoint_last.pt"
    stamp = finished.stat().st_mtime_ns
    # An interrupted run of a third variant: one of its two epochs, then killed.
    args = experiments.build_parser().parse_args(study_args(out, "focal"))
    (run,) = studies.plan_runs(studies.selected_variants(["loss"], "focal"), [0], out)
    command = studies.train_command(run, studies.common_train_args(args), 1)
    train.main(command[3:] + ["--stop-after", "1"])
    assert run.started and not run.finished

    result = experiments.main(study_args(out, "bce,central,focal"))
    assert [(r["run"].name, r["kind"]) for r in result["launched"]] == [("none-focal", "resume")]
    assert finished.stat().st_mtime_ns == stamp
    assert len(json.loads((run.folder / "metrics.json").read_text())) == 2
    record = json.loads((run.folder / "experiment.json").read_text())
    assert [i["kind"] for i in record["invocations"]] == ["resume"] and "--resume" in record["invocations"][0]["command"]
    assert "| focal | 1 |" in (out / "report.md").read_text()


def test_a_study_folder_refuses_other_training_options(tiny_study, capsys):
    out, _ = tiny_study
    with pytest.raises(SystemExit) as exit_info:
        experiments.main([a if a != "2" else "3" for a in study_args(out)])  # --epochs 3
    assert exit_info.value.code == 2 and "use another --out" in capsys.readouterr().err


def test_runs_shared_between_studies_are_trained_once(tmp_path):
    variants = studies.selected_variants(studies.studies_of("all"), None)
    runs = studies.plan_runs(variants, [0, 1], tmp_path)
    names = sorted({r.name for r in runs})
    # 4 losses + r 0, 1, 3 + 4 transformers; central r = 2 without transformer is in all three studies.
    assert len(names) == 11 and len(runs) == 22 and "none-central-r2" in names
    assert {"coor-central-r2+position-fourier", "swin-central-r2", "deformable-central-r2", "none-central-r0"} <= set(names)


def test_spine_studies_use_the_development_holdout_and_report_the_cobb_smape(tmp_path):
    args = experiments.build_parser().parse_args(["--study", "transformer", "--data", "spine", "--root",
                                                  str(tmp_path), "--out", str(tmp_path / "out")])
    common = studies.common_train_args(args)
    assert common[:4] == ["--profile", "auto", "--data", "spine"]
    for option, split in (("--train-split", "holdout_train"), ("--val-split", "holdout_val"),
                          ("--test-split", "holdout_test")):
        assert common[common.index(option) + 1] == split
    row = {"seeds": [0], "missing": [], "unit": "px", "thresholds": [10.0], "mre": {"mean": 30.0, "std": None},
           "sdr": {"10": {"mean": 40.0, "std": None}}, "smape": {"mean": 21.5, "std": None, "n": 1},
           "p_value": None, "wall_s": {"mean": 60.0, "std": None}, "images_per_s": {"mean": 3.0, "std": None}}
    table = study_report.study_table({"reference": "coor", "variants": {"coor": row}})
    assert "| variant | seeds | MRE (px) | SDR 10 px (%) | Cobb SMAPE (%) | p vs coor |" in table
    assert "| coor (ref.) | 1 | 30.00 | 40.00 | 21.50 | — |" in table
    assert "SMAPE" not in study_report.study_table({"reference": "coor", "variants": {"coor": dict(row, smape=None)}})
    # Where the evaluations say on which vertebra the corners landed, the share on their own, in %.
    row["own_vertebra"] = {"mean": 0.507, "std": 0.02, "n": 2}
    table = study_report.study_table({"reference": "coor", "variants": {"coor": row}})
    assert "| Cobb SMAPE (%) | corners on own vertebra (%) | p vs coor |" in table
    assert "| 21.50 | 50.7 ± 2.0 | — |" in table


def test_p_values_are_marked_like_the_paper():
    assert study_report.format_p(1e-6) == "1e-06 (**)"
    assert study_report.format_p(0.01) == "0.01 (*)"
    assert study_report.format_p(0.3) == "0.3"
    assert study_report.format_p(None) == "n/a" and study_report.format_p(float("nan")) == "n/a"


def test_the_study_folder_config_reproduces_the_options(tmp_path, capsys):
    from coorkern.engine.config import parse_with_config

    out = tmp_path / "study"
    experiments.main(study_args(out) + ["--report-only"])  # no training: options, config.yaml, empty report
    config = out / "config.yaml"
    original, _ = parse_with_config(experiments.build_parser(), study_args(out))
    again, from_file = parse_with_config(experiments.build_parser(), ["--config", str(config)])
    assert from_file and vars(again) == dict(vars(original), config=str(config))
    assert again.seeds == [0]  # one seed survives the round trip ("0," rather than K = 0)
    experiments.main(["--config", str(config), "--report-only"])  # --config runs the study
    assert (out / "report.md").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: loss\nsede: 3\n")
    with pytest.raises(SystemExit):
        experiments.main(["--config", str(bad), "--out", str(tmp_path)])
    assert "sede" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["--variants", "bce"], "--study is required"),
    (["--study", "losses"], "--study"),
    (["--study", "loss", "--variants", "bce,mse"], "mse"),
    (["--study", "r", "--variants", "coor"], "coor"),
    (["--study", "loss", "--seeds", "a,b"], "--seeds"),
    (["--study", "loss", "--seeds", "1,1"], "--seeds"),
    (["--study", "loss", "--jobs", "0"], "--jobs"),
    (["--study", "loss", "--data", "isbi2015"], "--root"),
    (["--study", "loss", "--profile", "gpu"], "--profile"),
    (["--study", "loss", "--train-args", "--lr 'x"], "quotation"),
])
def test_bad_arguments_give_clear_errors(bad, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(bad + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


REALDATA = REALDATA_DIR


@pytest.mark.skipif(not (REALDATA / "isbi2015").is_dir(), reason="no ../shared/realdata/isbi2015 next to the repository")
def test_isbi2015_holdout_split_of_the_150_training_images(tmp_path):
    from coorkern import data

    args = experiments.build_parser().parse_args(["--study", "loss", "--data", "isbi2015", "--root",
                                                  str(REALDATA / "isbi2015"), "--profile", "cpu", "--out",
                                                  str(tmp_path)])
    common = studies.common_train_args(args)
    table = tmp_path / "isbi2015_holdout.csv"
    assert common[:7] == ["--profile", "cpu", "--data", "csv", "--root", str(table), "--image-size"]
    assert common[7:11] == ["256", "208", "--val-split", "val"]
    train_set = data.load_dataset("csv", table, "train", (256, 208))
    val_set = data.load_dataset("csv", table, "val", (256, 208))
    test_set = data.load_dataset("csv", table, "test", (256, 208))
    assert [r.id for r in train_set.records] == [f"{i:03d}" for i in range(1, 86)]
    assert [r.id for r in val_set.records] == [f"{i:03d}" for i in range(86, 101)]
    assert [r.id for r in test_set.records] == [f"{i:03d}" for i in range(101, 151)]
    # The same landmarks (and 0.1 mm spacing) as the isbi2015 loader gives for those images.
    loader = data.load_dataset("isbi2015", REALDATA / "isbi2015", "train", (256, 208), ids=[1, 150]).records
    for ours, theirs in zip([train_set.records[0], test_set.records[-1]], loader):
        assert ours.image_path == Path(theirs.image_path).resolve()
        assert abs(ours.landmarks - theirs.landmarks).max() < 1e-3 and tuple(ours.spacing) == (0.1, 0.1)
