"""Training, checkpoints/resume, evaluation and prediction commands on tiny synthetic runs."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coorkern import train
from coorkern.engine import checkpoints, predictor

pytest.importorskip("PIL.Image")

TINY = ["--image-size", "64", "64", "--train-samples", "32", "--val-samples", "8", "--test-samples", "8",
        "--batch-size", "4", "--base-channels", "4", "--heads", "2", "2", "1", "1", "--no-progress",
        "--threads", "1", "--overlays", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    # 12 validation images: enough to calibrate finite 90% conformal radii (at least 9 are needed).
    result = train.main(TINY + ["--epochs", "4", "--lr", "3e-3", "--val-samples", "12", "--out", str(out)])
    return result


def test_short_training_run_loss_falls_and_writes_the_run_folder(tiny_run):
    history = tiny_run["history"]
    assert len(history) == 4
    assert history[-1]["train_loss"] < 0.95 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    run = tiny_run["run_dir"]
    for name in ("config.json", "config.yaml", "metrics.json", "metrics.csv", "checkpoint_best.pt",
                 "checkpoint_last.pt", "test_metrics.json"):
        assert (run / name).is_file(), name
    from PIL import Image

    for name, size in (("curves.png", (1000, 380)), ("per_landmark.png", (960, 380))):
        with Image.open(run / name) as plot:  # a real PNG of the figure's size
            assert plot.format == "PNG" and plot.size == size, name
    assert len(list((run / "overlays").glob("*.png"))) == 2
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 5
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["base_channels"] == 4 and config["args"]["loss"] == "central"
    report = json.loads((run / "test_metrics.json").read_text())
    assert set(report) >= {"model", "baseline"} and report["model"]["unit"] == "mm"
    assert [r.name for r in run.iterdir() if r.name.endswith(".tmp")] == []


def test_checkpoint_loads_with_weights_only_and_round_trips(tiny_run):
    path = tiny_run["run_dir"] / "checkpoint_last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "model_config"} <= set(ckpt)
    assert ckpt["epoch"] == 3
    model = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(path))
    for key, value in tiny_run["model"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    config = {"model": {"in_channels": 1}}
    path = checkpoints.save_checkpoint(tmp_path / "c.pt", model=model, config=config, epoch=0)
    before = path.read_bytes()

    def killed(obj, f, *a, **k):  # the process dies half-way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, model=model, config=config, epoch=1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_resume_continues_exactly(tmp_path):
    args = TINY + ["--epochs", "2", "--deterministic", "--overlays", "0", "--train-samples", "16"]
    straight = train.main(args + ["--out", str(tmp_path / "a")])
    first = train.main(args + ["--out", str(tmp_path / "b"), "--stop-after", "1"])
    assert first["test"] is None and len(first["history"]) == 1
    resumed = train.main(["--resume", str(tmp_path / "b" / "checkpoint_last.pt"), "--no-progress", "--threads", "1"])
    assert resumed["run_dir"] == tmp_path / "b"
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    def strip(history):  # everything but the timings
        return [{k: v for k, v in row.items() if "time" not in k and "images_per_s" not in k} for row in history]

    assert strip(straight["history"]) == strip(resumed["history"])


@pytest.mark.parametrize("loss", train.LOSSES)
def test_losses_are_finite_and_differentiable(loss):
    logits = torch.randn(2, 3, 16, 20, requires_grad=True)
    landmarks = torch.rand(2, 3, 2) * 15
    value = train.compute_loss(loss, logits, landmarks, sigma=2.0)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_baseline_losses_match_their_formulas():
    import math

    from coorkern import heatmap_loss, losses
    from coorkern.reference import gaussian_heatmaps

    logits = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    landmarks = torch.rand(2, 3, 2) * 9
    target = gaussian_heatmaps(landmarks, 12, 10, 1.5).double()
    p = torch.sigmoid(logits)
    ratio = 12 * 10 / (2 * math.pi * 1.5**2)
    wbce = -(ratio * target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert torch.allclose(losses.weighted_bce_loss(logits, landmarks, 1.5), wbce)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert torch.allclose(losses.bce_loss(logits, landmarks, 1.5), bce)
    assert torch.allclose(losses.focal_loss(logits, landmarks, 1.5, gamma=0.0), bce)  # gamma 0 is BCE
    p_t = p * target + (1 - p) * (1 - target)
    focal = (-(target * torch.log(p) + (1 - target) * torch.log(1 - p)) * (1 - p_t) ** 2).mean()
    assert torch.allclose(losses.focal_loss(logits, landmarks, 1.5), focal)
    assert train.compute_loss is heatmap_loss
    with pytest.raises(ValueError, match="kind"):
        heatmap_loss("mse", logits.float(), landmarks, 1.5)


def test_cli_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--data", "--root", "--image-size", "--epochs", "--batch-size", "--lr", "--loss", "--r",
                   "--sigma", "--transformer", "--base-channels", "--device", "--amp", "--compile", "--seed",
                   "--deterministic", "--out", "--resume"):
        assert option in text, option
    for bad in (["--loss", "mse"], ["--epochs", "0"], ["--amp", "fp8"], ["--lr", "1e-4", "--min-lr", "1e-3"],
                ["--data", "isbi2015"], ["--resume", "/nonexistent/ckpt.pt"], ["--device", "tpu:9"],
                ["--image-size", "64"], ["--data", "hand", "--root", "/nonexistent"]):
        with pytest.raises(SystemExit) as exit_info:
            train.main(bad)
        assert exit_info.value.code == 2, bad
        assert "error" in capsys.readouterr().err.lower()


def test_evaluate_and_predict_commands(tiny_run, tmp_path):
    from coorkern import evaluate, predict

    run = tiny_run["run_dir"]
    report = evaluate.main(["--checkpoint", str(run), "--out", str(tmp_path / "eval"), "--overlays", "1"])
    assert report["split"] == "test" and len(report["predictions"]) == 8
    assert report["baseline"] is not None and "per_landmark" in report["metrics"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["data"] == "synthetic"
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 1

    image = tmp_path / "xray.png"
    from PIL import Image

    Image.new("L", (100, 80), 128).save(image)
    result = predict.main(["--checkpoint", str(run / "checkpoint_best.pt"), str(image), "--out",
                           str(tmp_path / "pred"), "--spacing", "0.1"])
    (entry,) = result
    assert len(entry["landmarks_px"]) == 19 and len(entry["landmarks_mm"]) == 19
    assert entry["image_size"] == [80, 100]
    quantile = torch.load(run / "checkpoint_best.pt", weights_only=True)["conformal"]["quantile"]
    # Radii calibrated in the model's 64x64 pixels, mapped to this 100x80 image (the larger scale, 100/64).
    assert entry["radius_px"] == pytest.approx([q * 100 / 64 for q in quantile], abs=1e-3)
    assert entry["radius_mm"] == pytest.approx([q * 100 / 64 * 0.1 for q in quantile], abs=1e-3)
    assert entry["landmarks"][3] == {"landmark": 3, "x": entry["landmarks_px"][3][0], "y": entry["landmarks_px"][3][1],
                                     "x_mm": entry["landmarks_mm"][3][0], "y_mm": entry["landmarks_mm"][3][1],
                                     "confidence": entry["confidence"][3], "radius_px": entry["radius_px"][3],
                                     "radius_mm": entry["radius_mm"][3], "coverage": 0.9}
    assert (tmp_path / "pred" / "xray_landmarks.png").is_file()
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]["image"] == str(image)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(run), str(tmp_path / "missing.png"), "--out", str(tmp_path / "none")])
    assert exit_info.value.code == 1 and not (tmp_path / "none").exists()  # nothing predicted, nothing written


def test_module_help_runs_as_a_command():
    env = dict(os.environ)
    for module in ("coorkern.train", "coorkern.evaluate", "coorkern.predict"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: python -m " + module in proc.stdout


def test_mixed_precision_and_baseline_losses_run(tmp_path):
    result = train.main(TINY + ["--epochs", "1", "--train-samples", "8", "--amp", "bf16", "--loss", "focal",
                                "--overlays", "0", "--out", str(tmp_path / "amp")])
    assert len(result["history"]) == 1 and result["test"] is not None


def test_training_on_a_custom_csv_dataset(tmp_path):
    """The real-data path: Pillow images + CSV, resize, augmentation, validation carved from the training split,
    mm from a spacing column."""
    from PIL import Image

    from coorkern.data import render_synthetic

    images, landmarks = render_synthetic(list(range(10)), (80, 96))
    rows = ["image,x0,y0,x1,y1,x2,y2,spacing"]
    for i in range(10):
        Image.fromarray((images[i, 0] * 255).clamp(0, 255).byte().numpy()).save(tmp_path / f"{i}.png")
        coords = ",".join(f"{v:.3f}" for v in landmarks[i, :3].reshape(-1).tolist())
        rows.append(f"{i}.png,{coords},0.25")
    (tmp_path / "landmarks.csv").write_text("\n".join(rows) + "\n")
    result = train.main(TINY + ["--data", "csv", "--root", str(tmp_path), "--image-size", "64", "64", "--epochs", "1",
                                "--out", str(tmp_path / "run")])
    assert result["config"]["args"]["augment"] is True
    # 10 rows, 80% train: the 8th validates (not augmented), the 2 test rows are never seen before the report.
    assert result["config"]["splits"]["val"]["ids"] == ["7"] and result["config"]["splits"]["test"]["images"] == 2
    assert result["test"]["unit"] == "mm" and len(result["test"]["per_landmark"]) == 3
    assert result["config"]["model"]["num_landmarks"] == 3


def test_hand_data_with_data_options_and_predict_in_mm(tmp_path):
    from support.format_fixtures import hand_fixture

    hand_fixture(tmp_path / "hand", n=8, size=(80, 64))  # 5 train rows: 4 to train (batch 4), 1 to select
    result = train.main(TINY + ["--data", "hand", "--root", str(tmp_path / "hand"), "--epochs", "1",
                                "--data-option", "landmark_indices=[0,1,5,9]", "--out", str(tmp_path / "run")])
    assert result["config"]["model"]["num_landmarks"] == 4
    assert result["config"]["data_options"]["landmark_indices"] == [0, 1, 5, 9]
    assert result["test"]["unit"] == "mm" and result["test"]["thresholds"] == [2.0, 4.0, 10.0]
    coords = torch.tensor([[0.0, 0.0], [10.0, 10.0], [13.0, 14.0], [5.0, 5.0]])  # wrist 1 -> 5: 5 px
    assert predictor.hand_spacing(result["config"], coords) == [10.0, 10.0]
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--data", "hand", "--root", str(tmp_path / "hand"), "--data-option", "bogus=1"])
    assert exit_info.value.code == 2


def test_conformal_radii_are_stored_at_the_end_of_training_and_evaluated(tiny_run, tmp_path):
    from coorkern import evaluate

    run = tiny_run["run_dir"]
    calibration = torch.load(run / "checkpoint_best.pt", weights_only=True)["conformal"]
    assert calibration["coverage"] == 0.9 and calibration["split"] == "val" and calibration["count"] == [12] * 19
    assert all(0 < q < float("inf") for q in calibration["quantile"])
    assert "conformal" not in torch.load(run / "checkpoint_last.pt", weights_only=True)
    test_report = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= test_report["conformal"]["overall"] <= 1.0 and len(test_report["conformal"]["per_landmark"]) == 19
    # On the calibration split itself every landmark is covered at least at the requested rate.
    report = evaluate.main(["--checkpoint", str(run), "--split", "val", "--out", str(tmp_path / "val"),
                            "--overlays", "0"])
    assert min(report["conformal"]["per_landmark"]) >= 0.9
    assert (tmp_path / "val" / "per_landmark.png").is_file()


class BlobFinder(torch.nn.Module):
    """Stands in for a trained detector: each heatmap is the (normalized) input itself, as log-probabilities."""

    def __init__(self, num_landmarks: int) -> None:
        super().__init__()
        self.num_landmarks = num_landmarks

    def forward(self, x):
        flat = x.flatten(1)
        lo, hi = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
        p = ((x - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
        return torch.logit(p).expand(-1, self.num_landmarks, -1, -1)


def _blob_png(path, size, center, sigma):
    from PIL import Image

    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    blob = torch.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * sigma**2))
    Image.fromarray((blob * 65535).round().to(torch.int32).numpy().astype("uint16")).save(path)


def test_predicted_coordinates_match_known_positions_in_any_image_size(tiny_run, tmp_path, monkeypatch):
    """Bright blobs at known sub-pixel positions in images of other sizes than the model's 64x64 input."""
    from coorkern import predict

    monkeypatch.setattr(predictor, "model_from_checkpoint", lambda ckpt, device: BlobFinder(19))
    cases = {"wide.png": ((150, 200), (123.4, 45.6), 9.0), "small.png": ((48, 40), (20.3, 30.7), 3.0),
             "same.png": ((64, 64), (10.5, 50.2), 2.5)}
    for name, (size, center, sigma) in cases.items():
        _blob_png(tmp_path / name, size, center, sigma)
    results = predict.main(["--checkpoint", str(tiny_run["run_dir"]), str(tmp_path / "*.png"), "--spacing", "0.2",
                            "0.1", "--out", str(tmp_path / "out"), "--no-progress", "--batch-size", "2"])
    assert [Path(r["image"]).name for r in results] == sorted(cases)
    for entry in results:
        size, center, _ = cases[Path(entry["image"]).name]
        assert entry["image_size"] == list(size)
        record = entry["landmarks"][7]
        assert record["x"] == pytest.approx(center[0], abs=0.25) and record["y"] == pytest.approx(center[1], abs=0.25)
        assert record["x_mm"] == pytest.approx(record["x"] * 0.2, abs=1e-3)
        assert record["y_mm"] == pytest.approx(record["y"] * 0.1, abs=1e-3)
        assert entry["spacing_source"] == "given" and 0.9 < record["confidence"] <= 1.0


def test_predict_takes_millimetres_from_the_image_header(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("SimpleITK")
    from support.format_fixtures import write_itk

    from coorkern import predict

    monkeypatch.setattr(predictor, "model_from_checkpoint", lambda ckpt, device: BlobFinder(19))
    ys, xs = torch.meshgrid(torch.arange(90.0), torch.arange(120.0), indexing="ij")
    blob = torch.exp(-((xs - 70.3) ** 2 + (ys - 30.6) ** 2) / (2 * 6.0**2))
    write_itk(tmp_path / "scan.mha", (blob * 1000).round().short().numpy(), spacing=(0.3, 0.2))
    (entry,) = predict.main(["--checkpoint", str(tiny_run["run_dir"]), str(tmp_path / "scan.mha"), "--out",
                             str(tmp_path / "out"), "--no-progress"])
    assert entry["spacing_source"] == "image header" and entry["spacing_mm"] == [0.3, 0.2]
    record = entry["landmarks"][0]
    assert record["x"] == pytest.approx(70.3, abs=0.25) and record["y"] == pytest.approx(30.6, abs=0.25)
    assert (record["x_mm"], record["y_mm"]) == pytest.approx((record["x"] * 0.3, record["y"] * 0.2), abs=1e-3)
    # The radius in mm: model pixels -> this image's pixels (120/64 wide, 90/64 high) -> mm, the larger axis.
    assert record["radius_mm"] == pytest.approx(record["radius_px"] / (120 / 64) * max(120 / 64 * 0.3, 90 / 64 * 0.2),
                                                rel=1e-3)
    # The same scan as an extension-less DICOM file: PixelSpacing lists (row, column) = (y, x).
    from support.format_fixtures import write_dicom

    write_dicom(tmp_path / "scan_dicom", (blob * 1000).round().numpy(), pixel_spacing=(0.2, 0.3))
    (dicom,) = predict.main(["--checkpoint", str(tiny_run["run_dir"]), str(tmp_path / "scan_dicom"), "--out",
                             str(tmp_path / "out_dicom"), "--no-progress", "--no-overlay"])
    assert dicom["spacing_source"] == "image header" and dicom["spacing_mm"] == pytest.approx([0.3, 0.2])
    assert dicom["landmarks"][0]["x_mm"] == pytest.approx(record["x_mm"], abs=1e-3)


def test_predict_skips_unreadable_files_and_exits_non_zero(tiny_run, tmp_path, capsys):
    from PIL import Image

    from coorkern import predict

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (100, 80), 90).save(folder / "a.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "b.bmp")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image holds")
    (folder / "notes.txt").write_text("not an image, and not an image file name: ignored")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(tiny_run["run_dir"]), str(folder), str(tmp_path / "missing.png"),
                      "--format", "csv", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "missing.png" in captured.err and "notes.txt" not in captured.err
    assert "2 input(s) could not be read" in captured.err
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert (tmp_path / "out" / "predictions.csv").read_text() == captured.out
    assert len(rows) == 2 * 19 and sorted({Path(r["image"]).name for r in rows}) == ["a.png", "b.bmp"]
    assert list(rows[0]) == list(predictor.CSV_FIELDS)
    assert rows[0]["x_mm"] == "" and float(rows[0]["radius_px"]) > 0 and rows[0]["coverage"] == "0.9"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a_landmarks.png", "b_landmarks.png"]
