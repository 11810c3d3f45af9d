"""Cobb angles by the AASCE 2019 challenge's rule, and its SMAPE."""

import numpy as np
import pytest
import torch

from coorkern import data
from coorkern.metrics import cobb_angles, smape, vertebra_level_shift
from support.paths import REALDATA
from support.spine_fixtures import c_curve_centres, s_curve_centres, spine_corners

SPINE = REALDATA / "spine"
ATOL = 1e-5  # degrees; the rule rounds each cosine to 8 decimals

# A single (C) curve: most tilted vertebrae 3 (-12 deg) and 10 (+26 deg).
C_TILTS = [0, -4, -8, -12, -8, -2, 4, 10, 16, 22, 26, 20, 14, 8, 2, -2, 0]
# An S: upper curve between vertebrae 1 (0 deg) and 4 (+25), main curve 4..9 (-25), lower 9..14 (+15).
S_TILTS = [4, 0, 10, 20, 25, 15, 0, -10, -20, -25, -15, -5, 5, 10, 15, 10, 5]


def test_straight_spines_have_zero_angles():
    vertical = spine_corners([0] * 17, s_curve_centres(amplitude=0))
    leaning = spine_corners([7] * 17, c_curve_centres(bulge=0, drift=-60))  # all vertebrae parallel
    result = cobb_angles(np.stack([vertical, leaning]), 600)
    np.testing.assert_allclose(result, np.zeros((2, 3)), atol=ATOL)


def test_single_curve_main_angle_is_the_tilt_difference():
    # Not S: second = angle(first vertebra, upper end) = |0 - (-12)|, third = angle(last, lower end) = |0 - 26|.
    result = cobb_angles(spine_corners(C_TILTS, c_curve_centres()), 1000)
    np.testing.assert_allclose(result, [38.0, 12.0, 26.0], atol=ATOL)
    # The same spine rotated as a whole: the same angles.
    turn = np.deg2rad(8)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    rotated = spine_corners(C_TILTS, c_curve_centres()) @ rotation.T + [300, 50]
    np.testing.assert_allclose(cobb_angles(rotated, 1000), [38.0, 12.0, 26.0], atol=ATOL)


def test_s_curve_secondary_angles_depend_on_the_image_height():
    spine = spine_corners(S_TILTS, s_curve_centres())
    # Main curve 4..9: 50 deg; second: the largest angle from vertebra 4 upwards (to vertebra 1): 25.
    # The bottom end-plate centres of vertebrae 4 and 9 are at y = 144.53 and 294.53 (sum 439.06):
    # with a taller image the main curve is "in the upper part" and the third angle is the largest
    # from vertebra 9 downwards (to 14: 40); otherwise the largest above vertebra 1 (to 0: 4).
    np.testing.assert_allclose(cobb_angles(spine, 440), [50.0, 25.0, 40.0], atol=ATOL)
    np.testing.assert_allclose(cobb_angles(spine, 430), [50.0, 25.0, 4.0], atol=ATOL)  # top plates: 420.94
    batch = cobb_angles(torch.tensor(np.stack([spine, spine])), torch.tensor([10000.0, 100.0]))
    assert torch.allclose(batch, torch.tensor([[50.0, 25.0, 40.0], [50.0, 25.0, 4.0]], dtype=torch.float64),
                          atol=ATOL)


def test_angles_over_90_degrees_are_kept():
    tilts = [0] * 16 + [150]  # e.g. a last vertebra annotated with left and right swapped
    result = cobb_angles(spine_corners(tilts, c_curve_centres()), 1000)
    assert result[0] == pytest.approx(150.0, abs=ATOL)


def test_tensor_and_array_inputs_batch_shapes_and_dtypes():
    spines = np.stack([spine_corners(C_TILTS, c_curve_centres()), spine_corners(S_TILTS, s_curve_centres())])
    grid = np.stack([spines, spines[::-1], spines])  # (3, 2, 68, 2)
    heights = np.array([[1000.0, 440.0], [440.0, 1000.0], [1000.0, 440.0]])
    from_numpy = cobb_angles(grid, heights)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (3, 2, 3) and from_numpy.dtype == np.float64
    np.testing.assert_allclose(from_numpy[0], [[38, 12, 26], [50, 25, 40]], atol=ATOL)
    np.testing.assert_allclose(from_numpy[1], from_numpy[0][::-1], atol=ATOL)
    as_float32 = cobb_angles(torch.tensor(grid, dtype=torch.float32), torch.tensor(heights))
    assert isinstance(as_float32, torch.Tensor) and as_float32.dtype == torch.float32
    assert torch.allclose(as_float32.double(), torch.from_numpy(from_numpy), atol=1e-3)
    single = cobb_angles(grid[0, 1].tolist(), 440)  # nested lists, one spine: (3,)
    np.testing.assert_allclose(single, [50, 25, 40], atol=ATOL)
    as_int = cobb_angles(torch.tensor(np.round(grid[0]), dtype=torch.int64), 1000)
    assert as_int.dtype == torch.float64 and as_int.shape == (2, 3)


def test_degenerate_spines_give_nan():
    spine = spine_corners(C_TILTS, c_curve_centres())
    collapsed = spine.copy()
    collapsed[8:12] = collapsed[8]  # vertebra 2's four corners coincide
    missing = spine.copy()
    missing[5, 0] = np.nan
    result = cobb_angles(np.stack([spine, collapsed, missing]), 1000)
    np.testing.assert_allclose(result[0], [38, 12, 26], atol=ATOL)
    assert np.isnan(result[1:]).all()


@pytest.mark.parametrize("shape", [(68,), (68, 3), (67, 2), (4, 2), (2, 68)])
def test_cobb_rejects_landmarks_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"landmarks must have shape \(\.\.\., 68, 2\)"):
        cobb_angles(np.zeros(shape), 100)


def test_cobb_rejects_bad_heights_and_inputs():
    spines = np.zeros((2, 68, 2))
    with pytest.raises(ValueError, match=r"image_height must be a number or have the landmarks' leading shape "
                                         r"\(2,\), got \(3,\)"):
        cobb_angles(spines, np.ones(3))
    for bad in (0, -5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="image_height must be positive and finite"):
            cobb_angles(spines, bad)
    with pytest.raises(TypeError, match="landmarks must be"):
        cobb_angles({"x": 1}, 100)
    with pytest.raises(TypeError, match="image_height must be"):
        cobb_angles(spines, "tall")


def test_smape_on_known_numbers():
    pred = np.array([[10.0, 20.0, 30.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    true = np.array([[12.0, 18.0, 30.0], [10.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    # (2 + 2 + 0) / 120, 10 / 10, 0 / 10
    per = smape(pred, true, per_image=True)
    np.testing.assert_allclose(per, [100 * 4 / 120, 100.0, 0.0])
    assert smape(pred, true) == pytest.approx((100 * 4 / 120 + 100.0) / 3)
    assert smape(torch.tensor(pred[:1]), torch.tensor(true[:1])) == pytest.approx(100 * 4 / 120)
    assert smape(pred[0], true[0]) == pytest.approx(100 * 4 / 120)  # one image: (3,)
    assert smape(np.zeros((1, 3)), np.zeros((1, 3))) == 0.0  # 0/0: perfect agreement
    assert smape(pred, pred) == 0.0
    per_tensor = smape(torch.tensor(pred, dtype=torch.float32), torch.tensor(true), per_image=True)
    assert isinstance(per_tensor, torch.Tensor) and per_tensor.shape == (3,)


def test_smape_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"true_angles must have the shape of pred_angles \(2, 3\), got \(3, 3\)"):
        smape(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="pred_angles must have shape"):
        smape(np.float64(1.0), np.float64(1.0))
    with pytest.raises(ValueError, match="at least one image"):
        smape(np.ones((0, 3)), np.ones((0, 3)))


@pytest.mark.skipif(not SPINE.is_dir(), reason=f"{SPINE} not present")
def test_real_training_angles_csv_is_reproduced_from_the_mat_landmarks():
    records = data.spine_records(SPINE, "train")
    assert len(records) == 481
    landmarks = np.stack([r.landmarks for r in records])
    heights = np.array([r.image_height for r in records])
    truth = np.stack([r.angles for r in records])
    difference = np.abs(cobb_angles(landmarks, heights) - truth)
    # angles.csv keeps 5 significant digits: every difference is within that rounding (<= 0.005 deg).
    assert (np.median(difference, axis=0) <= 0.05).all()
    assert (np.median(difference, axis=0) <= 0.001).all()
    assert difference.max() <= 0.005
    assert smape(cobb_angles(landmarks, heights), truth) < 0.01


# --------------------------------------------------------------------------- vertebra levels


def test_vertebra_level_shift_finds_the_vertebra_each_corner_landed_on():
    rng = np.random.default_rng(3)
    truth = spine_corners(rng.uniform(-10, 10, 17), s_curve_centres())
    # Within a third of a vertebra's spacing: every corner on its own level.
    jitter = truth + rng.uniform(-4, 4, truth.shape)
    assert (vertebra_level_shift(jitter, truth) == 0).all()
    # Every vertebra predicted where the next one down is: +1, the lowest stays (nothing below it).
    down = np.concatenate([truth[4:], truth[-4:]])
    expected = np.array([1] * 64 + [0] * 4)
    np.testing.assert_array_equal(vertebra_level_shift(down, truth), expected)
    # One corner two levels up, the rest in place; batched tensors in, a tensor out.
    moved = truth.copy()
    moved[4 * 9 + 2] = truth[4 * 7 + 2]
    batch = torch.tensor(np.stack([truth, moved]))
    shift = vertebra_level_shift(batch, torch.tensor(np.stack([truth, truth])))
    assert isinstance(shift, torch.Tensor) and shift.shape == (2, 68)
    assert (shift[0] == 0).all() and shift[1, 4 * 9 + 2] == -2 and shift[1].abs().sum() == 2
    # A missing prediction has no level; a missing true corner is never the nearest.
    gaps = truth.copy()
    gaps[5] = np.nan
    assert vertebra_level_shift(gaps, truth)[5] == -99
    assert (vertebra_level_shift(truth, np.where(np.arange(68)[:, None] == 9, np.nan, truth))[
        np.arange(68) != 9] == 0).all()


@pytest.mark.parametrize("pred, truth, message", [
    (np.zeros((19, 2)), np.zeros((19, 2)), "pred must have shape"),
    (np.zeros((68, 2)), np.zeros((2, 68, 2)), "truth must have the shape"),
    ("corners", np.zeros((68, 2)), "pred must be"),
])
def test_vertebra_level_shift_refuses_bad_shapes(pred, truth, message):
    with pytest.raises((ValueError, TypeError), match=message):
        vertebra_level_shift(pred, truth)
