"""coorkern.engine.study_report: the transformer study's report -- p-values against none and vanilla,
convergence on the validation split, attention focus -- on a tiny synthetic study, and its pieces by hand."""

from __future__ import annotations

import json

import pytest

from coorkern import experiments
from coorkern.engine import study_report

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

TINY_TRAIN = ("--train-samples 8 --val-samples 4 --test-samples 6 --batch-size 4 --base-channels 2 "
              "--heads 2 2 1 1 --lr 3e-3")


@pytest.fixture(scope="module")
def transformer_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("transformer_study")
    args = ["--study", "transformer", "--variants", "none,vanilla,coor", "--seeds", "1", "--epochs", "3",
            "--image-size", "64", "64", "--jobs", "2", "--threads", "2", "--out", str(out), "--train-args", TINY_TRAIN]
    return out, experiments.main(args)


def test_the_transformer_study_compares_with_none_and_vanilla(transformer_study):
    out, result = transformer_study
    assert not result["failed"]
    study = result["report"]["studies"]["transformer"]
    assert study["compare"] == ["coor", "none", "vanilla"]
    rows = study["variants"]
    for variant, row in rows.items():
        assert set(row["p_values"]) == {"coor", "none", "vanilla"}
        assert row["p_values"][variant] is None  # not against itself
        others = [p for other, p in row["p_values"].items() if other != variant]
        assert all(0 < p <= 1 for p in others), (variant, row["p_values"])
    assert rows["coor"]["p_values"]["none"] == pytest.approx(rows["none"]["p_values"]["coor"])  # symmetric test
    text = (out / "report.md").read_text()
    assert "| p vs coor | p vs none | p vs vanilla |" in text
    assert study_report.format_p(rows["coor"]["p_values"]["vanilla"]) in text


def test_convergence_comes_from_the_validation_curves(transformer_study):
    out, result = transformer_study
    rows = result["report"]["studies"]["transformer"]["variants"]
    for variant, row in rows.items():
        history = json.loads((out / "runs" / row["run"] / "seed0" / "metrics.json").read_text())
        curve = [h["val_mre_mm"] for h in history]
        assert row["val_mre"] == pytest.approx(curve)
        assert row["best_val_mre"] == {"value": pytest.approx(min(curve)), "epoch": curve.index(min(curve)) + 1}
        select = json.loads((out / "runs" / row["run"] / "seed0" / "config.json").read_text())["args"]["select"]
        scores = [h["val_loss"] for h in history] if select == "loss" else curve
        assert row["selected_val_mre"]["mean"] == pytest.approx(curve[scores.index(min(scores))])
        assert row["val_mre_at"][10]["mean"] is None  # 3 epochs only
        for other, reached in row["epochs_to_reach"].items():
            target = rows[other]["best_val_mre"]["value"]
            expected = next((e for e, v in enumerate(curve, 1) if v <= target), None)
            assert reached == expected
    text = (out / "report.md").read_text()
    assert "### Convergence (validation split)" in text and "epochs to none's best val MRE" in text


def test_attention_focus_of_every_run_with_attention(transformer_study):
    out, result = transformer_study
    rows = result["report"]["studies"]["transformer"]["variants"]
    assert rows["none"]["attention"] is None
    assert not (out / "runs" / rows["none"]["run"] / "seed0" / "eval" / "attention.json").exists()
    for variant in ("vanilla", "coor"):
        saved = json.loads((out / "runs" / rows[variant]["run"] / "seed0" / "eval" / "attention.json").read_text())
        assert saved["split"] == "val" and saved["images"] == study_report.FOCUS_IMAGES
        blocks = rows[variant]["attention"]
        assert [b["name"] for b in blocks] == [s["name"] for s in saved["stages"]]
        for block, stage in zip(blocks, saved["stages"]):
            assert block["landmark_mass_ratio"] == pytest.approx(stage["landmark_mass_ratio"])
            assert 0 < block["entropy_ratio"] <= 1 + 1e-6
            assert stage["output_max_abs_error"] < 1e-4  # the numbers describe the attention the model runs
        moved = [b["displacement_mean"] for b in blocks]
        assert all(m is None for m in moved) if variant == "vanilla" else all(m is not None for m in moved)
    text = (out / "report.md").read_text()
    assert "### Attention focus" in text and "| coor | decoder" in text and "| none |" not in text.split(
        "### Attention focus")[1]


def test_epochs_to_reach_and_mean_curves_by_hand():
    assert study_report._epochs_to_reach([5.0, 3.0, 2.0, 2.5], 2.9) == 3
    assert study_report._epochs_to_reach([5.0, None, 1.0], 1.0) == 3
    assert study_report._epochs_to_reach([5.0, 4.0], 3.0) is None
    assert study_report._epochs_to_reach([5.0], None) is None
    assert study_report._mean_curve([[1.0, 3.0, 5.0], [3.0, None]]) == [2.0, None]
