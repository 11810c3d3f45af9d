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


def test_decode_defaults_to_logits():
    heat = gaussian_heatmaps(torch.tensor([[[5.3, 4.6]]]), 10, 12, 1.5)
    logits = torch.logit(heat.clamp(1e-7, 1 - 1e-7))
    coords, conf = metrics.decode_heatmaps(logits)
    assert (coords[0, 0] - torch.tensor([5.3, 4.6])).abs().max() < 0.05
    assert float(conf[0, 0]) == pytest.approx(float(heat.max()), rel=1e-4)


@pytest.mark.parametrize("where", [(1.3, 1.2), (10.4, 1.4), (1.4, 7.6), (10.3, 8.3)])
def test_decode_refines_next_to_the_border(where):
    """Peaks one pixel from an edge use both neighbours (one of them on the edge)."""
    h, w = 10, 12
    heat = gaussian_heatmaps(torch.tensor([[where]]), h, w, 1.0)
    coords, _ = metrics.decode_heatmaps(heat, logits=False)
    assert (coords[0, 0] - torch.tensor(where)).abs().max() < 1e-3


@pytest.mark.parametrize("row, col", [(0, 0), (0, 5), (7, 11), (7, 0), (3, 11)])
def test_decode_peak_on_the_border_is_not_refined_across_it(row, col):
    h, w = 8, 12
    heat = torch.full((1, 1, h, w), 0.01)
    heat[0, 0, row, col] = 1.0
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):  # unequal neighbours: a refinement would move it
        r, c = row + dr, col + dc
        if 0 <= r < h and 0 <= c < w:
            heat[0, 0, r, c] = 0.6 if dr + dc < 0 else 0.3
    coords, conf = metrics.decode_heatmaps(heat, logits=False)
    x_edge, y_edge = col in (0, w - 1), row in (0, h - 1)
    if x_edge:
        assert float(coords[0, 0, 0]) == col
    else:
        assert abs(float(coords[0, 0, 0]) - col) > 0.05
    if y_edge:
        assert float(coords[0, 0, 1]) == row
    else:
        assert abs(float(coords[0, 0, 1]) - row) > 0.05
    assert float(conf[0, 0]) == pytest.approx(1.0)


def test_decode_error_messages_name_the_argument():
    with pytest.raises(ValueError, match=r"^heatmaps must have shape \(B, L, H, W\) \(4-D\)"):
        metrics.decode_heatmaps(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="^heatmaps must"):
        metrics.decode_heatmaps([[0.0]])


def test_radial_errors_per_sample_spacing():
    pred = torch.tensor([[[1.0, 2.0], [4.0, 6.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0], [1.0, 1.0]]])
    truth = torch.tensor([[[1.0, 1.0], [1.0, 2.0], [0.0, 0.0]], [[-1.0, -2.0], [2.0, 2.0], [1.0, 2.0]]])
    spacing = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    errors = metrics.radial_errors(pred, truth, spacing)
    expected = [[2.0, math.hypot(1.5, 8.0), 0.0], [math.hypot(3.0, 1.0), 0.0, 0.25]]
    assert errors.tolist() == [pytest.approx(row) for row in expected]


def test_summary_of_a_landmark_without_or_with_one_valid_error():
    nan = float("nan")
    errors = torch.tensor([[1.0, nan, nan], [3.0, nan, 1.5]], dtype=torch.float64)
    m = metrics.landmark_metrics(errors, thresholds=(0.5, 2))
    empty = m["per_landmark"][1]
    assert set(empty) == {"mre", "std", "median", "count", "sdr"} and empty["count"] == 0
    assert all(math.isnan(empty[k]) for k in ("mre", "std", "median"))
    assert set(empty["sdr"]) == {"0.5", "2"} and all(math.isnan(v) for v in empty["sdr"].values())
    single = m["per_landmark"][2]
    assert (single["mre"], single["std"], single["median"], single["count"]) == (1.5, 0.0, 1.5, 1)
    assert single["sdr"] == {"0.5": 0.0, "2": 100.0}
    assert m["per_landmark"][0]["median"] == pytest.approx(1.0)  # torch's lower median of (1, 3)
    assert m["overall"]["median"] == pytest.approx(1.5)


def test_unit_of_mixed_spacing_message():
    with pytest.raises(ValueError, match=r"^some samples have a pixel spacing and others do not: .* mm and px$"):
        metrics.unit_of(torch.tensor([[0.1, 0.1], [float("nan"), float("nan")]]))


def test_format_table_layout():
    errors = torch.tensor([[1.0, 3.0], [2.0, 6.0]], dtype=torch.float64)
    m = metrics.landmark_metrics(errors, thresholds=(2.5,), unit="px")
    base = metrics.landmark_metrics(errors * 2, thresholds=(2.5,), unit="px")
    assert metrics.format_table(m).splitlines() == [
        "       MRE (px)    std  SDR 2.5px",
        "model     3.000  1.871     50.00%",
    ]
    table = metrics.format_table(m, base, per_landmark=True).splitlines()
    assert table == [
        "                       MRE (px)    std  SDR 2.5px",
        "model                     3.000  1.871     50.00%",
        "baseline (mean shape)     6.000  3.742     25.00%",
        "  landmark 0              1.500  0.500    100.00%",
        "  landmark 1              4.500  1.500      0.00%",
    ]


def test_radial_errors_moves_the_spacing_to_the_predictions_device():
    """Spacing from a CPU data loader, predictions elsewhere (the meta device stands in for a GPU)."""
    pred = torch.zeros(2, 3, 2, device="meta")
    errors = metrics.radial_errors(pred, torch.zeros(2, 3, 2, device="meta"), torch.ones(2, 2))
    assert errors.shape == (2, 3) and errors.device.type == "meta"
