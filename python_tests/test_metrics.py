"""Decoding (sub-pixel peaks) and MRE/SDR metrics on hand-computed cases."""

import math

import pytest
import torch

from coorkern import metrics
from coorkern.reference import gaussian_heatmaps


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("as_logits", [False, True])
def test_decode_subpixel_gaussian_peaks(sigma, as_logits):
    g = torch.Generator().manual_seed(1)
    h, w = 40, 56
    lm = torch.rand(3, 5, 2, generator=g) * torch.tensor([w - 6.0, h - 6.0]) + 3.0  # away from the border
    heat = gaussian_heatmaps(lm, h, w, sigma)
    x = torch.logit(heat.clamp(1e-7, 1 - 1e-7)) if as_logits else heat
    coords, conf = metrics.decode_heatmaps(x, logits=as_logits)
    assert coords.shape == (3, 5, 2) and conf.shape == (3, 5)
    assert (coords - lm).abs().max() < 0.1
    # The plain argmax is off by up to half a pixel: the refinement is what gets below 0.1 px.
    assert ((coords - lm).abs().max() < (coords.round() - lm).abs().max()) or (coords - lm).abs().max() < 1e-3
    assert torch.all(conf > 0.7) and torch.all(conf <= 1.0)


def test_decode_border_and_flat_maps():
    heat = torch.zeros(1, 2, 8, 8)
    heat[0, 0, 0, 7] = 1.0  # a peak in the corner: no neighbours on two sides
    coords, conf = metrics.decode_heatmaps(heat, logits=False)
    assert coords[0, 0].tolist() == [7.0, 0.0]
    assert torch.isfinite(coords).all() and torch.isfinite(conf).all()  # all-zero map: finite, low confidence
    assert conf[0, 1] < 1e-6


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError, match="B, L, H, W"):
        metrics.decode_heatmaps(torch.zeros(4, 4))
    with pytest.raises(TypeError):
        metrics.decode_heatmaps(torch.zeros(1, 1, 4, 4, dtype=torch.int64))


def test_radial_errors_with_spacing_and_pixels():
    pred = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    truth = torch.tensor([[[0.0, 0.0], [1.0, float("nan")]]])
    err_px = metrics.radial_errors(pred, truth)
    assert err_px[0, 0] == pytest.approx(5.0)
    assert math.isnan(err_px[0, 1])
    err_mm = metrics.radial_errors(pred, truth, torch.tensor([[0.1, 0.2]]))
    assert err_mm[0, 0] == pytest.approx(math.sqrt(0.3**2 + 0.8**2))
    unknown = metrics.radial_errors(pred, truth, torch.tensor([[float("nan"), float("nan")]]))
    assert unknown[0, 0] == pytest.approx(5.0)


def test_landmark_metrics_hand_computed():
    errors = torch.tensor([[1.0, 3.0], [2.0, 5.0], [float("nan"), 4.0]], dtype=torch.float64)
    m = metrics.landmark_metrics(errors, thresholds=(2, 4))
    overall = m["overall"]
    assert overall["count"] == 5
    assert overall["mre"] == pytest.approx((1 + 3 + 2 + 5 + 4) / 5)
    assert overall["sdr"]["2"] == pytest.approx(40.0)  # 1, 2 (<= is a success)
    assert overall["sdr"]["4"] == pytest.approx(80.0)
    assert m["per_landmark"][0]["mre"] == pytest.approx(1.5)
    assert m["per_landmark"][0]["sdr"]["2"] == pytest.approx(100.0)
    assert m["per_landmark"][1]["mre"] == pytest.approx(4.0)
    assert m["per_landmark"][1]["sdr"]["4"] == pytest.approx(200 / 3)
    assert m["per_landmark"][1]["std"] == pytest.approx(math.sqrt(2 / 3))
    assert m["unit"] == "mm" and m["thresholds"] == [2.0, 4.0]


def test_landmark_metrics_validation_and_units():
    with pytest.raises(ValueError, match="thresholds"):
        metrics.landmark_metrics(torch.zeros(2, 2), thresholds=(0,))
    with pytest.raises(ValueError, match="shape"):
        metrics.landmark_metrics(torch.zeros(2))
    assert metrics.unit_of(torch.tensor([[0.1, 0.1]])) == "mm"
    assert metrics.unit_of(torch.full((2, 2), float("nan"))) == "px"
    with pytest.raises(ValueError, match="mix"):
        metrics.unit_of(torch.tensor([[0.1, 0.1], [float("nan"), float("nan")]]))


def test_baseline_and_table():
    train = torch.tensor([[[0.0, 0.0]], [[2.0, 4.0]]])
    assert metrics.mean_shape_baseline(train).tolist() == [[1.0, 2.0]]
    m = metrics.landmark_metrics(torch.tensor([[1.0]]), (2.0,), unit="px")
    table = metrics.format_table(m, m, per_landmark=True)
    assert "baseline" in table and "SDR 2px" in table and "landmark 0" in table


def test_baseline_ignores_missing_landmarks():
    nan = float("nan")
    train = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[2.0, 4.0], [nan, nan]], [[4.0, 2.0], [3.0, 5.0]]])
    baseline = metrics.mean_shape_baseline(train)
    assert baseline.dtype == torch.float32
    assert baseline.tolist() == [[2.0, 2.0], [2.0, 3.0]]
