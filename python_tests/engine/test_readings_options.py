"""``coorkern train``'s options for the readings of the coordinate module: they reach the model, its optimizer
groups and schedule, the run's config.yaml and the checkpoint's model config, and old checkpoints still load."""

import json

import pytest
import torch
import yaml

from coorkern import train
from coorkern.engine import checkpoints, studies
from coorkern.models import CoorDetector

TINY = ["--image-size", "64", "64", "--train-samples", "12", "--val-samples", "4", "--test-samples", "4",
        "--batch-size", "4", "--base-channels", "4", "--heads", "2", "2", "1", "1", "--no-progress",
        "--threads", "1", "--overlays", "0", "--epochs", "1"]
READINGS = ["--coord-mode", "absolute", "--coord-groups", "2", "--offset-range", "8", "--offset-init-std", "0.05",
            "--coord-lr-mult", "10", "--coord-source", "queries", "--position", "fourier",
            "--vanilla-position", "sincos"]
EXPECTED = dict(coord_mode="absolute", coord_groups=2, offset_range=8.0, offset_init_std=0.05, coord_lr_mult=10.0,
                coord_source="queries", position="fourier", vanilla_position="sincos")


@pytest.fixture(scope="module")
def readings_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("readings") / "run"
    return train.main(TINY + READINGS + ["--out", str(out)])


def test_the_options_reach_the_model_and_every_record_of_the_run(readings_run):
    run = readings_run["run_dir"]
    model = readings_run["model"]
    for key, value in EXPECTED.items():
        assert getattr(model, key) == value, key
    saved_yaml = yaml.safe_load((run / "config.yaml").read_text())
    saved_json = json.loads((run / "config.json").read_text())
    for key, value in EXPECTED.items():
        assert saved_yaml[key] == value and saved_json["args"][key] == value, key
    # The checkpoint's model config is the model's own config: every constructor argument.
    ckpt = torch.load(run / "checkpoint_best.pt", weights_only=True)
    assert ckpt["model_config"] == model.config == saved_json["model"]
    assert set(ckpt["model_config"]) == set(CoorDetector(num_landmarks=1).config)
    rebuilt = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(run / "checkpoint_best.pt"))
    assert rebuilt.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value.cpu()), key


def test_the_coordinate_modules_train_at_their_own_rate(readings_run):
    ckpt = torch.load(readings_run["run_dir"] / "checkpoint_last.pt", weights_only=True)
    model_group, coordinate_group = ckpt["optimizer"]["param_groups"]
    assert (model_group["name"], coordinate_group["name"]) == ("model", "coordinates")
    assert coordinate_group["lr_mult"] == 10.0 and model_group["lr_mult"] == 1.0
    # The cyclic schedule runs per group between lr_mult x (min-lr, lr).
    assert ckpt["scheduler"]["base_lrs"] == pytest.approx([1e-4, 1e-3])
    assert ckpt["scheduler"]["max_lrs"] == pytest.approx([1e-3, 1e-2])
    # 3 steps of a 1-step half cycle: min -> max -> min -> max.
    assert (model_group["lr"], coordinate_group["lr"]) == pytest.approx((1e-3, 1e-2))


def test_the_run_config_reruns_the_same_model(readings_run, tmp_path):
    run = readings_run["run_dir"]
    options = train.parse_args(["--config", str(run / "config.yaml"), "--out", str(tmp_path / "again")])
    for key, value in EXPECTED.items():
        assert getattr(options.args, key) == value, key
    again = train.main(["--config", str(run / "config.yaml"), "--out", str(tmp_path / "again")])
    assert again["model"].config == readings_run["model"].config


def test_old_checkpoints_without_the_readings_still_load_and_resume(readings_run, tmp_path):
    ckpt = torch.load(readings_run["run_dir"] / "checkpoint_last.pt", weights_only=True)
    readings = set(EXPECTED) | {"sample", "token_strides", "window_size"}
    old_model = {k: v for k, v in ckpt["model_config"].items() if k not in readings}
    old = dict(ckpt, model_config=old_model)
    old["config"] = dict(ckpt["config"], model=old_model,
                         args={k: v for k, v in ckpt["config"]["args"].items()
                               if k not in EXPECTED and k not in ("val_fraction", "train_images")})
    # A model of that time's defaults (no positions): the optimizer state of one group.
    fresh = CoorDetector(**old_model, position="none")
    old["model"] = fresh.state_dict()
    old["optimizer"] = torch.optim.Adam(fresh.parameters()).state_dict()
    torch.save(old, tmp_path / "old.pt")
    model = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(tmp_path / "old.pt"))
    assert model.coord_mode == "offset" and model.position == "none" and model.coord_lr_mult == 1.0
    options = train.parse_args(["--resume", str(tmp_path / "old.pt")])
    assert options.args.coord_mode == "offset" and options.args.val_fraction == 0.1


@pytest.mark.parametrize("bad, message", [
    (["--coord-mode", "relative"], "--coord-mode"), (["--offset-range", "-1"], "--offset-range"),
    (["--coord-lr-mult", "inf"], "--coord-lr-mult"), (["--coord-groups", "0"], "--coord-groups"),
    (["--position", "sine"], "--position"),
    (["--heads", "8", "4", "2", "1", "--coord-groups", "3"], "coord_groups (3) must divide"),
])
def test_bad_readings_are_refused_as_option_errors(bad, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + bad + ["--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_transformer_study_has_reading_variants_on_request(tmp_path):
    default = studies.selected_variants(["transformer"], None)["transformer"]
    assert set(default) == {"none", "vanilla", "swin", "deformable", "coor"}
    chosen = studies.selected_variants(["transformer"], "coor,coor+linear,vanilla+sincos")["transformer"]
    runs = {r.name: r for r in studies.plan_runs({"transformer": chosen}, [0], tmp_path)}
    # coor spells out its position, so a folder names the model it holds whatever the default is.
    assert set(runs) == {"coor-central-r2+position-fourier", "coor-central-r2+position-linear",
                         "vanilla-central-r2+vanilla_position-sincos"}
    command = studies.train_command(runs["coor-central-r2+position-linear"], ["--data", "synthetic"], 1)
    assert command[command.index("--position") + 1] == "linear"
    command = studies.train_command(runs["coor-central-r2+position-fourier"], [], 1)
    assert command[command.index("--position") + 1] == "fourier"
    assert "--position" not in studies.train_command(runs["vanilla-central-r2+vanilla_position-sincos"], [], 1)
    offset = studies.selected_variants(["transformer"], "coor+offset")["transformer"]["coor+offset"]
    assert studies.run_name(offset) == "coor-central-r2+position-none"
    every = studies.selected_variants(["transformer"], ",".join(studies.READING_VARIANTS))["transformer"]
    for name, settings in every.items():  # each extra variant is a valid command line
        command = studies.train_command(studies.StudyRun(name, settings, 0, tmp_path / name), [], 1)
        options = train.parse_args(command[3:]).args
        for key in studies.READING_OPTIONS:
            if key in settings:
                assert getattr(options, key) == settings[key], (name, key)
    rates = studies.selected_variants(["transformer"], "none+lr0.01,vanilla+lr0.01,coor+lr0.01")["transformer"]
    runs = {r.name: r for r in studies.plan_runs({"transformer": rates}, [0], tmp_path)}
    # none at the higher rate is the loss study's central+lr0.01: trained once for both tables.
    assert studies.run_name(studies.LOSS_VARIANTS["central+lr0.01"]) in runs
    assert set(runs) == {"none-central-r2+lr-0.01+min_lr-0.001", "vanilla-central-r2+lr-0.01+min_lr-0.001",
                         "coor-central-r2+position-fourier+lr-0.01+min_lr-0.001"}
    for run in runs.values():  # the rate reaches the command line; the model is the paper variant's
        options = train.parse_args(studies.train_command(run, [], 1)[3:]).args
        assert (options.lr, options.min_lr, options.transformer) == (0.01, 0.001, run.settings["transformer"])
    assert {"none+lr0.01", "vanilla+lr0.01"} <= set(studies.STUDIES["transformer"]["compare"])
    with pytest.raises(ValueError, match="coor\\+nothing"):
        studies.selected_variants(["transformer"], "coor+nothing")
    with pytest.raises(ValueError, match="coor\\+linear"):
        studies.selected_variants(["loss"], "coor+linear")  # extras belong to the transformer study
