"""The loss study's fair baselines (issue 30, item 5): a learning rate per loss and weighted BCE's
positive weight as ``coorkern train`` options, and the study's variants that screen them."""

import math

import pytest
import torch
import yaml

from coorkern import losses, train
from coorkern.reference import gaussian_heatmaps
from coorkern.engine import studies, trainer

TINY = ["--image-size", "64", "64", "--train-samples", "8", "--val-samples", "4", "--test-samples", "4",
        "--batch-size", "4", "--base-channels", "4", "--heads", "2", "2", "1", "1", "--no-progress",
        "--threads", "1", "--overlays", "0", "--epochs", "1", "--transformer", "none"]


def test_weighted_bce_takes_a_given_positive_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    landmarks = torch.rand(2, 3, 2, dtype=torch.float64) * torch.tensor([5.0, 7.0])
    target = gaussian_heatmaps(landmarks, 7, 5, 1.5)
    p = torch.sigmoid(logits)
    for weight in (0.5, 10.0, 123.0):
        expected = -(weight * target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
        assert torch.allclose(losses.weighted_bce_loss(logits, landmarks, 1.5, weight), expected)
        assert torch.allclose(losses.heatmap_loss("wbce", logits, landmarks, 1.5, pos_weight=weight),
                              expected.float())
    # None is the area ratio; the other losses ignore the weight.
    ratio = losses.area_ratio(7, 5, 1.5)
    assert ratio == pytest.approx(35 / (2 * math.pi * 2.25))
    assert torch.equal(losses.weighted_bce_loss(logits, landmarks, 1.5),
                       losses.weighted_bce_loss(logits, landmarks, 1.5, ratio))
    assert torch.equal(losses.heatmap_loss("bce", logits, landmarks, 1.5, pos_weight=10.0),
                       losses.heatmap_loss("bce", logits, landmarks, 1.5))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "10"])
def test_a_bad_positive_weight_is_a_value_error(bad):
    with pytest.raises(ValueError, match="^pos_weight must be a finite number > 0"):
        losses.weighted_bce_loss(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 2), 1.0, bad)


@pytest.mark.parametrize("bad, message", [
    (["--loss", "bce", "--pos-weight", "10"], "--pos-weight is the weight of --loss wbce, not of --loss bce"),
    (["--loss", "wbce", "--pos-weight", "0"], "--pos-weight"),
])
def test_bad_loss_options_are_option_errors(bad, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + bad + ["--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_weight_and_rate_reach_the_loss_the_schedule_and_the_config(tmp_path, monkeypatch):
    weights = []

    def spy(kind, logits, landmarks, sigma, r=2.0, pos_weight=None):
        weights.append((kind, pos_weight))
        return losses.heatmap_loss(kind, logits, landmarks, sigma, r, pos_weight)

    monkeypatch.setattr(trainer, "heatmap_loss", spy)
    out = tmp_path / "run"
    train.main(TINY + ["--loss", "wbce", "--pos-weight", "7", "--lr", "3e-3", "--min-lr", "3e-4", "--out", str(out)])
    assert weights and set(weights) == {("wbce", 7.0)}  # training steps and the validation loss
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["loss"], saved["pos_weight"], saved["lr"], saved["min_lr"]) == ("wbce", 7.0, 3e-3, 3e-4)
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["scheduler"]["base_lrs"] == pytest.approx([3e-4])
    assert ckpt["scheduler"]["max_lrs"] == pytest.approx([3e-3])


def test_the_loss_study_screens_rates_and_weights_on_request(tmp_path):
    assert set(studies.selected_variants(["loss"], None)["loss"]) == {"bce", "wbce", "focal", "central"}
    chosen = studies.selected_variants(["loss"], "central,bce+lr0.01,wbce+w100+lr0.003,bce+prior")["loss"]
    runs = {r.name: r for r in studies.plan_runs({"loss": chosen}, [0], tmp_path)}
    # central keeps the folder it shares with the transformer study's none.
    assert set(runs) == {"none-central-r2", "none-bce+lr-0.01+min_lr-0.001",
                         "none-wbce+lr-0.003+min_lr-0.0003+pos_weight-100", "none-bce+head_bias--7.7"}
    every = studies.selected_variants(["loss"], ",".join(studies.LOSS_VARIANTS))["loss"]
    assert len(every) == len(studies.LOSS_VARIANTS) == 17
    for name, settings in every.items():  # each extra variant is a valid command line with its options
        command = studies.train_command(studies.StudyRun(name, settings, 0, tmp_path / name), [], 1)
        options = train.parse_args(command[3:]).args
        assert options.loss == settings["loss"]
        for key in studies.LOSS_OPTIONS:
            default = {"lr": 1e-3, "min_lr": 1e-4, "head_bias": -4.0}.get(key)
            assert getattr(options, key) == settings.get(key, default), (name, key)
        assert options.min_lr == pytest.approx(options.lr / 10)
    with pytest.raises(ValueError, match="bce\\+lr5"):
        studies.selected_variants(["loss"], "bce+lr5")


def test_every_compared_variant_is_one_the_study_can_run():
    for name, study in studies.STUDIES.items():
        known = {**study["variants"], **study.get("extra_variants", {})}
        assert set(study.get("compare", ())) <= set(known), name
    assert studies.STUDIES["loss"]["compare"] == ["central+lr0.01"]
