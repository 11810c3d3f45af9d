"""Resume continues a run exactly: weights, history, the best score so far and the RNG streams,
with augmentation and bf16 autocast on (the paths a plain resume test does not take)."""

import random

import numpy as np
import pytest
import torch

from coorkern import train

pytest.importorskip("PIL.Image")

TINY = ["--image-size", "64", "64", "--train-samples", "8", "--val-samples", "4", "--test-samples", "4",
        "--batch-size", "4", "--base-channels", "2", "--heads", "2", "2", "1", "1", "--no-progress",
        "--threads", "1", "--overlays", "0", "--epochs", "2", "--deterministic", "--augment", "--amp", "bf16"]


def rng_draws():
    """What the next user code would draw from each global generator."""
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def strip(history):  # everything but the timings
    return [{k: v for k, v in row.items() if "time" not in k and "images_per_s" not in k} for row in history]


def test_resume_with_augmentation_and_amp_continues_exactly(tmp_path):
    straight = train.main(TINY + ["--out", str(tmp_path / "a")])
    straight_draws = rng_draws()

    train.main(TINY + ["--out", str(tmp_path / "b"), "--stop-after", "1"])
    # Pretend an earlier score was better than anything to come: the resumed run must keep it
    # (and checkpoint_best.pt from epoch 1) instead of starting over from +inf.
    last = tmp_path / "b" / "checkpoint_last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["config"]["args"]["augment"] and ckpt["config"]["args"]["amp"] == "bf16"
    ckpt["best"] = -1.0
    torch.save(ckpt, last)
    torch.manual_seed(123)  # the resumed run must restore the generators, not inherit these
    random.seed(123)
    np.random.seed(123)
    resumed = train.main(["--resume", str(last), "--no-progress", "--threads", "1"])

    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert strip(straight["history"]) == strip(resumed["history"])
    assert rng_draws() == straight_draws
    assert torch.load(last, weights_only=True)["best"] == -1.0
    assert torch.load(tmp_path / "b" / "checkpoint_best.pt", weights_only=True)["epoch"] == 0
    assert torch.load(tmp_path / "a" / "checkpoint_best.pt", weights_only=True)["epoch"] in (0, 1)

