"""Training defaults (``coorkern.engine.profiles``: the profiles and the synthetic defaults) and
``python -m coorkern.train --profile``."""

from __future__ import annotations

import pytest
import torch

from coorkern import train
from coorkern.data import DEFAULT_IMAGE_SIZE
from coorkern.engine import profiles, trainer


def parse(argv):
    return train.build_parser().parse_args(argv), vars(train.build_parser(suppress_defaults=True).parse_args(argv))


@pytest.mark.parametrize("requested, data, device, expected", [
    ("auto", "isbi2015", "cpu", "cpu"), ("auto", "hand", "cuda", "paper"), ("auto", "csv", "cpu", "cpu"),
    ("auto", "spine", "cpu", "cpu"), ("auto", "spine", "cuda", "paper"),
    ("auto", "synthetic", "cpu", None), ("auto", "synthetic", "cuda", None),
    ("paper", "isbi2015", "cpu", "paper"), ("cpu", "chest", "cuda", "cpu"), ("paper", "synthetic", "cpu", "paper"),
])
def test_resolve_profile(requested, data, device, expected):
    assert profiles.resolve_profile(requested, data, device) == expected


def test_paper_profile_is_the_papers_configuration():
    args, explicit = parse(["--data", "isbi2015", "--root", "x", "--profile", "paper"])
    note = profiles.apply_profile(args, explicit, torch.device("cpu"))
    assert args.profile == "paper" and note.startswith("profile paper: 512x416")
    assert (args.image_size, args.base_channels, args.batch_size) == ([512, 416], 64, 2)
    assert (args.depths, args.heads, args.lr, args.min_lr) == ([1, 1, 1, 1], [8, 4, 2, 1], 1e-3, 1e-4)
    assert (args.loss, args.r, args.select) == ("central", 2.0, "loss")
    assert args.epochs == 100 and args.train_images is None
    for data, size in (("hand", [512, 384]), ("chest", [512, 512]), ("spine", [1024, 512])):
        args, explicit = parse(["--data", data, "--root", "x", "--profile", "paper"])
        profiles.apply_profile(args, explicit, "cuda")
        assert args.image_size == size


def test_cpu_profile_is_the_default_for_real_data_without_cuda_and_the_command_line_wins():
    args, explicit = parse(["--data", "isbi2015", "--root", "x", "--epochs", "3", "--data-option", "cache=false"])
    note = profiles.apply_profile(args, explicit, torch.device("cpu"))
    assert args.profile == "cpu" and "no CUDA device" in note and "--profile paper" in note
    assert args.epochs == 3 and args.image_size == [256, 208] and args.base_channels == 8
    assert args.data_option == [("cache", False)]  # not overridden by the profile's cache=True
    args, explicit = parse(["--data", "hand", "--root", "x"])
    note = profiles.apply_profile(args, explicit, torch.device("cpu"))
    assert args.data_option == [("cache", True)] and args.image_size == [256, 192]
    # A budget of images seen; the epochs follow from the training split once it is loaded.
    assert args.epochs is None and args.train_images == profiles.CPU_TRAIN_IMAGES == 6000
    assert "6000 training images seen" in note
    args, explicit = parse(["--data", "spine", "--root", "x"])
    profiles.apply_profile(args, explicit, torch.device("cpu"))
    assert args.profile == "cpu" and args.image_size == [320, 128] and args.epochs is None
    # The spine's own budget (68 landmarks need more images than ISBI's 19).
    assert args.train_images == profiles.CPU_SPINE_TRAIN_IMAGES == 9000
    assert profiles.PROFILES["paper"].budget("spine") is None
    # An explicit budget beats the paper profile's epoch count.
    args, explicit = parse(["--data", "hand", "--root", "x", "--profile", "paper", "--train-images", "500"])
    profiles.apply_profile(args, explicit, torch.device("cpu"))
    assert args.epochs is None and args.train_images == 500 and args.image_size == [512, 384]


def test_synthetic_data_keeps_the_training_commands_defaults():
    args, explicit = parse([])
    assert profiles.apply_profile(args, explicit, torch.device("cpu")) is None
    assert args.profile == "auto" and args.epochs is None and args.image_size is None
    with pytest.raises(ValueError, match="profile"):
        profiles.resolve_profile("fast", "isbi2015", "cpu")
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--profile", "fast"])


def test_training_on_real_format_data_prints_and_records_the_cpu_profile(tmp_path, capsys):
    from PIL import Image

    from coorkern.data import render_synthetic

    images, landmarks = render_synthetic(list(range(6)), (64, 64))
    rows = ["image,x0,y0,x1,y1,spacing"]
    for i in range(6):
        Image.fromarray((images[i, 0] * 255).clamp(0, 255).byte().numpy()).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png," + ",".join(f"{v:.2f}" for v in landmarks[i, :2].reshape(-1).tolist()) + ",0.5")
    (tmp_path / "landmarks.csv").write_text("\n".join(rows) + "\n")
    result = train.main(["--data", "csv", "--root", str(tmp_path), "--device", "cpu", "--epochs", "1",
                         "--image-size", "64", "64", "--base-channels", "2", "--heads", "2", "2", "1", "1",
                         "--no-progress", "--threads", "1", "--overlays", "0", "--out", str(tmp_path / "run")])
    assert "profile cpu: 64x64, base 2, batch 4, 1 epochs" in capsys.readouterr().out
    saved = result["config"]["args"]
    assert saved["profile"] == "cpu" and saved["select"] == "loss" and saved["batch_size"] == 4
    assert result["config"]["data_options"]["cache"] is True


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_synthetic_defaults_fill_only_the_options_not_given(device):
    args, _ = parse(["--epochs", "3", "--val-samples", "5"])
    trainer._resolve(args, torch.device(device))
    defaults = profiles.SYNTHETIC_DEFAULTS[device]
    assert args.epochs == 3 and args.val_samples == 5  # given: kept
    for key in ("base_channels", "batch_size", "train_samples", "test_samples"):
        assert getattr(args, key) == defaults[key], key
    assert args.image_size == list(defaults["image_size"] or DEFAULT_IMAGE_SIZE["synthetic"])
    assert (args.train_split, args.val_split, args.test_split) == ("train", "val", "test") and args.augment is False
