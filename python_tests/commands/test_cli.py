"""The ``coorkern`` command: console script, subcommands' help, ``info``, config files, TensorBoard."""

import importlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coorkern import cli, train
from support.paths import REPO_ROOT

ROOT = REPO_ROOT
TINY = ["--image-size", "64", "64", "--train-samples", "8", "--val-samples", "8", "--test-samples", "8",
        "--batch-size", "4", "--base-channels", "4", "--heads", "2", "2", "1", "1", "--threads", "1",
        "--overlays", "0", "--epochs", "1"]


def test_console_script_is_declared_and_its_entry_point_runs(capsys):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["scripts"]["coorkern"]
    module, _, function = target.partition(":")
    entry = getattr(importlib.import_module(module), function)
    assert entry is cli.main
    assert entry(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "experiments", "export", "info"):
        assert f"\n  {command} " in out, command
    for dependency in ("tqdm", "matplotlib", "PyYAML"):
        assert dependency in project["dependencies"]
    assert project["optional-dependencies"]["tensorboard"] == ["tensorboard"]


def test_python_dash_m_coorkern_runs_the_command_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "coorkern", "predict", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: coorkern predict")


def test_installed_console_script_runs():
    try:
        scripts = importlib.metadata.entry_points(group="console_scripts")
    except Exception:  # pragma: no cover - very old importlib.metadata
        scripts = []
    if not any(ep.name == "coorkern" and ep.value == "coorkern.cli:main" for ep in scripts):
        pytest.skip("coorkern is not pip-installed here (the console script exists after pip install)")
    exe = shutil.which("coorkern")
    assert exe is not None, "the coorkern console script is not on PATH"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: coorkern COMMAND" in proc.stdout


@pytest.mark.parametrize("command, options", [
    ("train", ["--config", "--data", "--epochs", "--tensorboard", "--coverage", "--conformal-score", "--resume"]),
    ("evaluate", ["--checkpoint", "--split", "--overlays"]),
    ("predict", ["--checkpoint", "--format", "--spacing", "--batch-size", "INPUT"]),
    ("export", ["--checkpoint", "--out", "--opset"]),
    ("info", ["--json"]),
])
def test_every_subcommand_has_complete_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: coorkern {command}")
    for option in options:
        assert option in text, option
    # One parser per command: python -m coorkern.<command> prints the same help.
    module = importlib.import_module(f"coorkern.{command}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    def words(help_text):  # the usage lines wrap at other places for a longer program name
        return help_text.replace(f"python -m coorkern.{command}", f"coorkern {command}").split()

    assert words(capsys.readouterr().out) == words(text)


def test_experiments_subcommand_dispatches_to_its_module(capsys):
    pytest.importorskip("coorkern.experiments")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experiments", "--help"])
    assert exit_info.value.code == 0
    assert "--study" in capsys.readouterr().out


def test_export_command_reports_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--checkpoint", str(tmp_path / "nothing.pt")])
    assert exit_info.value.code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_unknown_command_and_no_command(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "usage: coorkern COMMAND" in capsys.readouterr().out


def test_info_reports_versions_backends_cpu_and_profile(capsys):
    from coorkern import cpp_available

    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__
    assert info["backends"]["cpp_extension"]["usable"] == cpp_available()
    assert info["backends"]["cuda"]["usable"] == torch.cuda.is_available()
    assert info["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    profile = info["default_training_profile"]
    assert profile["name"] and profile["synthetic"]["epochs"] >= 1
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "C++ extension" in text and "Triton" in text and "default training profile" in text


# ---------------------------------------------------------------------------
# Config files


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_options_with_command_line_overrides(tmp_path):
    config = _write(tmp_path / "run.yaml", "epochs: 3\nlr: 1e-3\nimage-size: [64, 80]\nloss: focal\n"
                                           "augment: true\ndata_option: {annotator: senior, landmark_indices: [0, 4]}\n")
    options = train.parse_args(["--config", str(config), "--epochs", "2", "--no-augment"])
    args = options.args
    # Options from the file count as given (profiles fill only the rest); defaults do not.
    assert {"epochs", "lr", "image_size", "loss", "augment", "data_option"} <= set(options.explicit)
    assert "sigma" not in options.explicit and options.explicit["epochs"] == 2
    assert args.epochs == 2 and args.augment is False  # the command line wins
    assert args.lr == 1e-3 and args.image_size == [64, 80] and args.loss == "focal"
    assert dict(args.data_option) == {"annotator": "senior", "landmark_indices": [0, 4]}
    as_json = _write(tmp_path / "run.json", json.dumps({"sigma": 3, "depths": [1, 2, 1, 1], "deterministic": True}))
    args = train.parse_args(["--config", str(as_json)]).args
    assert args.sigma == 3.0 and args.depths == [1, 2, 1, 1] and args.deterministic is True


@pytest.mark.parametrize("text, message", [
    ("epohcs: 3\n", "unknown key 'epohcs' (did you mean 'epochs'?)"),
    ("colour: red\n", "unknown key 'colour'"),
    ("epochs: 0\n", "epochs: must be >= 1"),
    ("loss: mse\n", "loss: 'mse' is not one of"),
    ("image_size: 64\n", "image_size: expected a list of 2 values"),
    ("compile: yes please\n", "compile: expected true or false"),
    ("- epochs\n", "expected a mapping"),
    ("epochs: [\n", "not valid YAML"),
])
def test_bad_config_files_are_rejected_naming_the_key(tmp_path, capsys, text, message):
    config = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(config) in err


def test_missing_config_file_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "nope.yaml")])
    assert "file not found" in capsys.readouterr().err


def test_run_folder_config_reproduces_the_run_bitwise(tmp_path, capsys):
    first = train.main(TINY + ["--deterministic", "--progress", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "epoch 1/1" not in err  # the progress bar stays out of logs that are not a terminal
    config = tmp_path / "a" / "config.yaml"
    text = config.read_text()
    assert "deterministic: true" in text and "out:" not in text and "image_size: [64, 64]" in text
    again = cli_result = train.main(["--config", str(config), "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "config.yaml").read_text() == text
    a, b = first["model"].state_dict(), again["model"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert first["history"][0]["train_loss"] == cli_result["history"][0]["train_loss"]
    # The saved options are exactly this run's: changing one in the file changes the run.
    changed = _write(tmp_path / "changed.yaml", text.replace("seed: 0", "seed: 1"))
    args = train.parse_args(["--config", str(changed)]).args
    assert args.seed == 1 and args.epochs == 1 and args.base_channels == 4


# ---------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_event_file_has_the_expected_tags(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(TINY + ["--no-progress", "--tensorboard", "--epochs", "2", "--out", str(tmp_path / "run")])
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/loss_epoch", "val/loss", "val/mre", "val/sdr_2mm",
                "perf/images_per_s"):
        assert tag in tags["scalars"], tag
    assert len(acc.Scalars("train/loss")) == 4  # 2 epochs x 2 steps
    assert [e.step for e in acc.Scalars("val/mre")] == [1, 2]
    assert {"val/overlays", "val/heatmaps"} <= set(tags["images"])
    heatmaps = acc.Images("val/heatmaps")
    assert [e.step for e in heatmaps] == [1, 2]
    assert heatmaps[0].width * heatmaps[0].height == 4 * 64 * 64  # a grid of 4 validation images


def test_tensorboard_missing_gives_install_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--tensorboard", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "pip install 'coorkern[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
