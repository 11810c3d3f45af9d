"""``coorkern.predict`` returns landmarks at known positions, in input pixels and in mm.

A tiny run gives a real checkpoint; its weights are then replaced by a detector that passes
the image straight through to the logits (stem and final stage as identity convolutions,
everything else zero), so the predicted landmark is the brightest point of the input.  The
image holds one paraboloid dot, whose log-heatmap is nearly quadratic near the peak after the
resize, so the sub-pixel decoding is accurate to ~0.01 input pixel, and the back-scaling to the
input pixels (x_in + 0.5 = (x_net + 0.5) * W_in / W_net; scaling without the half-pixel terms
is off by 0.67 px in x and 0.44 px in y here) is checked to 0.05 px.
"""

import numpy as np
import pytest
import torch

from coorkern import predict, train
from coorkern.engine import trainer

PIL = pytest.importorskip("PIL.Image")

NET_SIZE = 64
IMAGE_SIZE = (120, 150)  # H, W of the input: 1.875 x 2.34 network pixels per input pixel
DOT = (37.3, 81.6)  # (x, y) in input pixels
RADIUS = 14.0


def pass_through(model):
    """Set the weights so that logits = -30 + 3 * relu(normalized image) for every landmark."""
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # identity in eval mode
            state[f"{name}.weight"].fill_(1.0)
            state[f"{name}.running_var"].fill_(1.0 - module.eps)
    centre = 1  # 3x3 kernels
    state["stem.0.0.weight"][0, 0, centre, centre] = 1.0
    state["stem.1.0.weight"][0, 0, centre, centre] = 1.0
    # The final stage sees cat(up-sampled decoder features, stem output): take channel 0 of the latter.
    fuse_in = model.final.fuse[0][0].in_channels - model.level_channels[0]
    state["final.fuse.0.0.weight"][0, fuse_in, centre, centre] = 1.0
    state["final.fuse.1.0.weight"][0, 0, centre, centre] = 1.0
    state["head.weight"][:, 0] = 3.0 * 4  # CBAM's zeroed gates halve twice
    state["head.bias"].fill_(-30.0)
    return state


def test_predicted_landmarks_are_at_the_dot_in_input_pixels_and_mm(tmp_path):
    run = train.main(["--image-size", str(NET_SIZE), str(NET_SIZE), "--train-samples", "4", "--val-samples", "4",
                      "--test-samples", "4", "--batch-size", "4", "--epochs", "1", "--base-channels", "2",
                      "--transformer", "none", "--no-progress", "--threads", "1", "--overlays", "0",
                      "--out", str(tmp_path / "run")])
    ckpt = torch.load(tmp_path / "run" / "checkpoint_best.pt", weights_only=True)
    ckpt["model"] = pass_through(run["model"])
    torch.save(ckpt, tmp_path / "pass_through.pt")

    h, w = IMAGE_SIZE
    rows, cols = np.mgrid[0:h, 0:w]
    dot = np.clip(1 - ((cols - DOT[0]) ** 2 + (rows - DOT[1]) ** 2) / RADIUS**2, 0, None)
    PIL.fromarray(np.round(dot * 65535).astype(np.uint16)).save(tmp_path / "dot.png")

    (entry,) = predict.main(["--checkpoint", str(tmp_path / "pass_through.pt"), str(tmp_path / "dot.png"),
                             "--spacing", "0.1", "0.2", "--out", str(tmp_path / "pred"), "--no-overlay"])
    assert entry["image_size"] == [h, w]
    coords = torch.tensor(entry["landmarks_px"])
    assert coords.shape == (19, 2)
    assert (coords - torch.tensor(DOT)).abs().max() < 0.05, coords[0]
    mm = torch.tensor(entry["landmarks_mm"], dtype=torch.float64)
    torch.testing.assert_close(mm, coords.double() * torch.tensor([0.1, 0.2], dtype=torch.float64), atol=1e-3, rtol=0)
    assert entry["landmarks_mm"][0] == pytest.approx([DOT[0] * 0.1, DOT[1] * 0.2], abs=0.01)


def test_training_spacing_is_kept_only_when_every_image_shares_it():
    from types import SimpleNamespace as NS

    same = NS(records=[NS(spacing=(0.1, 0.1)), NS(spacing=[0.1, 0.1])])
    mixed = NS(records=[NS(spacing=(0.1, 0.1)), NS(spacing=(0.12, 0.1))])
    assert trainer.common_spacing(same) == [0.1, 0.1]
    assert trainer.common_spacing(mixed) is None  # e.g. the hand atlas' per-image wrist spacing
    assert trainer.common_spacing(NS()) is None and trainer.common_spacing(NS(records=[])) is None  # synthetic
