"""Heatmap losses of ``train --loss`` (central and the Table II baselines bce, wbce, focal)
against values computed by hand, element by element, with the math module."""

import math

import pytest
import torch

from coorkern.train import compute_loss

LOGITS = [[-1.5, 0.3, 2.0], [0.0, -0.7, 1.1]]  # one 2 x 3 map
LANDMARK = (1.2, 0.4)  # (x, y): between the pixel centres
SIGMA = 1.5


def hand_loss(kind, logits=LOGITS, landmark=LANDMARK, sigma=SIGMA, r=2.0):
    """Mean over the pixels; a missing (None) landmark has an all-zero target."""
    height, width = len(logits), len(logits[0])
    total = 0.0
    for row in range(height):
        for col in range(width):
            x = logits[row][col]
            t = 0.0 if landmark is None else math.exp(
                -((col - landmark[0]) ** 2 + (row - landmark[1]) ** 2) / (2 * sigma**2))
            p = 1 / (1 + math.exp(-x))
            log_p, log_1mp = math.log(p), math.log(1 - p)
            if kind == "bce":
                total += -(t * log_p + (1 - t) * log_1mp)
            elif kind == "wbce":  # positives weighted by (map area) / (Gaussian area)
                weight = height * width / (2 * math.pi * sigma**2)
                total += -(weight * t * log_p + (1 - t) * log_1mp)
            elif kind == "focal":  # gamma 2
                p_t = p * t + (1 - p) * (1 - t)
                total += -(t * log_p + (1 - t) * log_1mp) * (1 - p_t) ** 2
            elif kind == "central":
                total += -abs(t - p) ** r * (t * log_p + (1 - t) * log_1mp)
    return total / (height * width)


@pytest.mark.parametrize("kind", ["bce", "wbce", "focal", "central"])
def test_loss_matches_the_hand_computed_value(kind):
    logits = torch.tensor(LOGITS)[None, None]
    value = compute_loss(kind, logits, torch.tensor([[LANDMARK]]), sigma=SIGMA)
    assert value.shape == ()
    assert float(value) == pytest.approx(hand_loss(kind), rel=1e-5)


@pytest.mark.parametrize("kind", ["bce", "wbce", "focal"])
def test_missing_landmark_has_an_all_zero_target(kind):
    logits = torch.tensor([LOGITS, LOGITS])[None]  # (1, 2, 2, 3): landmark 1 is missing
    landmarks = torch.tensor([[LANDMARK, (float("nan"), float("nan"))]])
    value = compute_loss(kind, logits, landmarks, sigma=SIGMA)
    expected = (hand_loss(kind) + hand_loss(kind, landmark=None)) / 2
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_losses_differ_from_each_other():
    """The hand values themselves tell the losses apart (so a swapped branch fails)."""
    values = [hand_loss(kind) for kind in ("bce", "wbce", "focal", "central")]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-2


@pytest.mark.parametrize("r", [0.5, 1.0, 3.0])
def test_central_loss_exponent_is_passed_on(r):
    value = compute_loss("central", torch.tensor(LOGITS)[None, None], torch.tensor([[LANDMARK]]), sigma=SIGMA, r=r)
    assert float(value) == pytest.approx(hand_loss("central", r=r), rel=1e-5)


def test_float64_logits_and_bad_arguments():
    from coorkern import losses

    logits = torch.tensor(LOGITS, dtype=torch.float64)[None, None]
    landmarks = torch.tensor([[LANDMARK]])  # float32: the targets take the logits' dtype
    for name, fn in (("bce", losses.bce_loss), ("wbce", losses.weighted_bce_loss), ("focal", losses.focal_loss)):
        value = fn(logits, landmarks, SIGMA)
        assert value.dtype == torch.float64 and float(value) == pytest.approx(hand_loss(name), rel=1e-6)
    with pytest.raises(ValueError, match="^kind must be one of"):
        compute_loss("mse", logits, landmarks, sigma=SIGMA)
    with pytest.raises(TypeError, match="^logits must be a torch.Tensor"):
        compute_loss("bce", LOGITS, landmarks, sigma=SIGMA)
    with pytest.raises(ValueError, match=r"^logits must have shape \(B, L, H, W\) \(4-D\)"):
        compute_loss("bce", logits[0], landmarks, sigma=SIGMA)
