"""Split-conformal uncertainty radii (coorkern.conformal) on synthetic error samples."""

import math

import pytest
import torch

from coorkern import conformal


def rayleigh(n, scales, generator):
    """Radial errors of 2-D Gaussian position noise with per-landmark ``scales`` (n, L)."""
    noise = torch.randn(n, len(scales), 2, generator=generator, dtype=torch.float64)
    return (noise * torch.tensor(scales, dtype=torch.float64)[None, :, None]).norm(dim=-1)


def test_radii_reach_the_requested_coverage_on_held_out_data():
    """90% radii from 500 calibration images cover 90% +- 5% of 200 new images, for every landmark."""
    scales = [0.5, 1.0, 2.0, 4.0, 8.0]
    overall = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        calibration = conformal.calibrate(rayleigh(500, scales, g), coverage=0.9)
        assert calibration["count"] == [500] * 5
        held_out = rayleigh(200, scales, g)
        result = conformal.empirical_coverage(held_out, conformal.radii(calibration, torch.ones(200, 5)))
        assert abs(result["overall"] - 0.9) <= 0.05, (seed, result)
        assert all(abs(c - 0.9) <= 0.1 for c in result["per_landmark"]), (seed, result)
        overall.append(result["overall"])
    # Over 20 repetitions (20 x 1000 predictions) the mean coverage is 0.9 within sampling error (sd ~0.002).
    assert abs(sum(overall) / len(overall) - 0.9) < 0.01
    # The radius follows each landmark's error scale: sqrt(-2 ln 0.1) sigma for Rayleigh errors.
    expected = [s * math.sqrt(-2 * math.log(0.1)) for s in scales]
    assert calibration["quantile"] == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("coverage", [0.5, 0.8, 0.95])
def test_other_coverages_are_met(coverage):
    g = torch.Generator().manual_seed(1)
    calibration = conformal.calibrate(rayleigh(1000, [1.0, 3.0], g), coverage=coverage)
    held_out = rayleigh(2000, [1.0, 3.0], g)
    result = conformal.empirical_coverage(held_out, conformal.radii(calibration, torch.ones(2000, 2)))
    assert abs(result["overall"] - coverage) < 0.03


def test_finite_sample_quantile_rank():
    errors = torch.arange(1.0, 10.0)[:, None]  # 1..9
    assert conformal.calibrate(errors, 0.9)["quantile"] == [9.0]  # ceil(10 * 0.9) = 9th smallest
    assert conformal.calibrate(errors, 0.5)["quantile"] == [5.0]  # ceil(10 * 0.5) = 5th
    assert conformal.calibrate(errors[:5], 0.9)["quantile"] == [math.inf]  # too few for 90%
    assert conformal.min_calibration_size(0.9) == 9 and conformal.min_calibration_size(0.95) == 19


def test_missing_landmarks_are_left_out_and_calibration_set_is_covered():
    g = torch.Generator().manual_seed(2)
    errors = rayleigh(300, [1.0, 2.0, 5.0], g)
    errors[::3, 1] = float("nan")
    calibration = conformal.calibrate(errors, 0.9)
    assert calibration["count"] == [300, 200, 300]
    # On the calibration set itself the k-th smallest score covers at least k/n >= 90% per landmark.
    covered = conformal.empirical_coverage(errors, conformal.radii(calibration, torch.ones(300, 3)))
    assert min(covered["per_landmark"]) >= 0.9


def test_peak_score_adapts_the_radius_to_the_confidence():
    """Errors that grow as the peak falls: the peak-scaled radii cover both groups, one radius per landmark does not."""
    g = torch.Generator().manual_seed(3)

    def sample(n):
        confidence = torch.where(torch.rand(n, 1, generator=g) < 0.5, 0.8, 0.1).double()
        errors = rayleigh(n, [1.0], g) / confidence  # error scale ~ 1 / peak
        return errors, confidence

    cal_errors, cal_conf = sample(1000)
    test_errors, test_conf = sample(2000)
    low = test_conf[:, 0] < 0.5
    scaled = conformal.calibrate(cal_errors, 0.9, cal_conf, score="peak")
    plain = conformal.calibrate(cal_errors, 0.9)
    for calibration, ok in ((scaled, True), (plain, False)):
        radius = conformal.radii(calibration, test_conf)
        low_coverage = conformal.empirical_coverage(test_errors[low], radius[low])["overall"]
        high_coverage = conformal.empirical_coverage(test_errors[~low], radius[~low])["overall"]
        if ok:
            assert abs(low_coverage - 0.9) < 0.04 and abs(high_coverage - 0.9) < 0.04
        else:
            assert low_coverage < 0.85 and high_coverage > 0.97
    # Peak-scaled radii are tighter where the model is confident.
    assert conformal.radii(scaled, torch.tensor([[0.8]])) < conformal.radii(plain, torch.tensor([[0.8]]))


def test_bad_arguments():
    errors = torch.rand(20, 3)
    with pytest.raises(ValueError, match="coverage"):
        conformal.calibrate(errors, 1.0)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        conformal.calibrate(errors[0], 0.9)
    with pytest.raises(ValueError, match="confidence"):
        conformal.calibrate(errors, 0.9, score="peak")
    with pytest.raises(ValueError, match="score"):
        conformal.calibrate(errors, 0.9, torch.rand(20, 3), score="spread")
    calibration = conformal.calibrate(errors, 0.9)
    with pytest.raises(ValueError, match="3 landmarks"):
        conformal.radii(calibration, torch.rand(5, 4))
