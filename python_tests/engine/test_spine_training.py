"""Spine data end to end on tiny AASCE-layout fixtures: the splits ``coorkern train --data spine`` picks, MRE/SDR in
the original images' pixels, the Cobb angles' SMAPE in test_metrics.json, and ``predict``'s angles and overlay."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from coorkern import data, metrics, predict, train
from coorkern.engine import checkpoints, cobb, inference, predictor, splits
from support.spine_fixtures import aasce_names, s_curve_centres, spine_corners, spine_fixture

PIL = pytest.importorskip("PIL.Image")

NET = (96, 32)
TINY = ["--image-size", str(NET[0]), str(NET[1]), "--batch-size", "4", "--base-channels", "4", "--heads", "2", "2",
        "1", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def spine_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("spine")
    spine_fixture(root / "copy", aasce_names(12), sizes=[(140 + 4 * i, 48 + i % 3) for i in range(12)])
    spine_fixture(root / "copy", aasce_names(4, offset=50), folder="test", sizes=[(150 + 9 * i, 50) for i in range(4)])
    result = train.main(TINY + ["--data", "spine", "--root", str(root / "copy"), "--epochs", "2", "--overlays", "2",
                                "--out", str(root / "run")])
    return root, result


def test_with_a_test_folder_it_trains_on_training_and_reports_test(spine_run):
    root, result = spine_run
    chosen = result["config"]["splits"]
    assert (chosen["train"]["split"], chosen["val"]["split"], chosen["test"]["split"]) == ("train", "carved", "test")
    assert (chosen["train"]["images"], chosen["val"]["images"], chosen["test"]["images"]) == (11, 1, 4)
    assert result["config"]["model"]["num_landmarks"] == 68


def test_test_metrics_hold_mre_in_original_pixels_and_the_cobb_smape(spine_run):
    root, result = spine_run
    run = result["run_dir"]
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["model"]["unit"] == "px" and report["model"]["pixels"] == "original image"
    assert report["model"]["thresholds"] == [10.0, 20.0, 30.0, 40.0]
    angles = report["cobb"]
    assert angles["truth"] == "angles.csv" and angles["images"] + angles["images_without_angles"] == 4
    assert set(angles["mae_deg"]) == {"main", "second", "third"}
    # Recomputed from the records themselves: predictions mapped back to each image's own pixels.
    ckpt = checkpoints.load_checkpoint(run / "checkpoint_best.pt")
    model = checkpoints.model_from_checkpoint(ckpt)
    test_set = data.load_dataset("spine", root / "copy", "test", NET)
    pred = inference.run_inference(model, test_set)["pred"].double()
    original = []
    for i, rec in enumerate(test_set.records):
        (h, w), (nh, nw) = rec.original_size, NET
        original.append((pred[i] + 0.5) * torch.tensor([w / nw, h / nh], dtype=torch.float64) - 0.5)
    original = torch.stack(original)
    truth = torch.from_numpy(np.stack([rec.landmarks for rec in test_set.records]))
    assert report["model"]["overall"]["mre"] == pytest.approx(float((original - truth).norm(dim=-1).mean()),
                                                                rel=1e-4)
    shift = metrics.vertebra_level_shift(original, truth)
    level = angles["vertebra_level"]
    assert level["own"] == pytest.approx(float((shift == 0).double().mean()))
    assert level["one_off"] == pytest.approx(float((shift.abs() == 1).double().mean()))
    assert level["own"] + level["one_off"] + level["further"] == pytest.approx(1.0)
    assert "on their own vertebra" in cobb.format_cobb(angles)
    pred_angles = metrics.cobb_angles(original, torch.tensor([rec.original_size[0] for rec in test_set.records]))
    true_angles = torch.from_numpy(np.stack([rec.angles for rec in test_set.records]))
    ok = torch.isfinite(pred_angles).all(-1)
    assert int(ok.sum()) == angles["images"]
    if angles["images"]:
        assert angles["smape"] == pytest.approx(metrics.smape(pred_angles[ok], true_angles[ok]), rel=1e-6)
        assert angles["mae_deg"]["main"] == pytest.approx(float((pred_angles[ok, 0] - true_angles[ok, 0])
                                                                .abs().mean()), rel=1e-6)


def test_the_run_folder_plots_and_overlays_read_with_68_landmarks(spine_run):
    run = spine_run[1]["run_dir"]
    with PIL.open(run / "per_landmark.png") as plot:  # 0.22 in per landmark + 2 in, at 100 dpi
        assert plot.size == (round(100 * (0.22 * 68 + 2)), 380)
    overlays = sorted((run / "overlays").glob("*.png"))
    assert len(overlays) == 2
    with PIL.open(overlays[0]) as image:  # 96 x 32 inputs drawn 10x larger (1024 // 96)
        assert image.size == (NET[1] * 10, NET[0] * 10)


@pytest.mark.filterwarnings("ignore:spine. .* annotated image.s. not found:UserWarning")
def test_without_a_test_folder_the_development_holdout_is_used(tmp_path, capsys):
    names = aasce_names(481)
    parts = {"holdout_train": (0, 1, 2, 3, 4, 5, 6, 7), "holdout_val": (269, 360, 361), "holdout_test": (340, 402)}
    keep = {names[i] for rows in parts.values() for i in rows}
    spine_fixture(tmp_path / "copy", names, images=keep, sizes=[(120, 40)] * 481)
    result = train.main(TINY + ["--data", "spine", "--root", str(tmp_path / "copy"), "--epochs", "1",
                                "--overlays", "0", "--out", str(tmp_path / "run")])
    assert "report 'holdout_test'; no test folder under --root: the development holdout" in capsys.readouterr().out
    args, chosen = result["config"]["args"], result["config"]["splits"]
    assert (args["train_split"], args["val_split"], args["test_split"]) == splits.SPINE_WITHOUT_TEST
    assert [chosen[k]["images"] for k in ("train", "val", "test")] == [8, 3, 2]
    assert "cobb" in json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    # With a test folder as well, the carved validation part is the same case-disjoint holdout_val rows.
    spine_fixture(tmp_path / "copy", aasce_names(2, offset=600), folder="test")
    assert splits.default_splits("spine", tmp_path / "copy") == ("train", "carved", "test")
    trained, validated, rule = splits.carve_validation(
        data.load_dataset("spine", tmp_path / "copy", "train", NET), 0.1, "spine", tmp_path / "copy")
    assert {r.id for r in validated.records} == {names[i][:-4] for i in parts["holdout_val"]}
    assert len(trained) == 10 and "holdout_val" in rule


def _tilted_spine(height: int) -> np.ndarray:
    tilts = 12 * np.sin(np.linspace(0, 2 * np.pi, 17))
    return spine_corners(tilts, s_curve_centres(amplitude=30, spacing=height / 19, x0=100, y0=height / 20),
                         height=height / 40, width=60)


def test_cobb_angles_are_measured_after_mapping_back_to_the_original_pixels(tmp_path):
    """An anisotropic resize changes angles: the report must undo it before applying the rule."""
    from PIL import Image

    records = []
    for i, (h, w) in enumerate([(600, 200), (540, 220)]):
        path = tmp_path / f"{i}.png"
        Image.new("L", (w, h), 100).save(path)
        angles = [np.nan] * 3 if i == 0 else [20.0, 10.0, 5.0]
        records.append(data.SpineRecord(str(i), path, _tilted_spine(h), angles=np.array(angles),
                                        original_size=(h, w)))
    dataset = data.LandmarkDataset(records, (96, 64), name="spine")
    resized = torch.stack([dataset[i]["landmarks"] for i in range(2)])
    result = cobb.cobb_report({"pred": resized}, dataset)
    expected = metrics.cobb_angles(torch.from_numpy(records[0].landmarks), 600)
    torch.testing.assert_close(result.pred[0], expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(result.truth[0], expected)  # no angles.csv row: the rule on the annotation
    assert result.truth[1].tolist() == [20.0, 10.0, 5.0]
    assert result.summary["truth"] == "angles.csv, else the annotated landmarks"
    assert (metrics.cobb_angles(resized[0].double(), 96) - expected).abs().max() > 1.0  # unmapped: wrong
    assert result.summary["images"] == 2 and result.summary["pixels"] == "original image"
    # The ground truth put through the resize and back: every corner on its own vertebra.
    assert result.summary["vertebra_level"] == {"own": 1.0, "one_off": 0.0, "further": 0.0}
    down = torch.cat([resized[:, 4:], resized[:, -4:]], dim=1)  # each vertebra where the next one is
    level = cobb.cobb_report({"pred": down}, dataset).summary["vertebra_level"]
    assert level["one_off"] == pytest.approx(64 / 68) and level["own"] == pytest.approx(4 / 68)


class KnownSpine(torch.nn.Module):
    """Stands in for a trained spine model: log-Gaussian peaks at fixed input-pixel positions, whatever the image."""

    def __init__(self, positions: torch.Tensor) -> None:
        super().__init__()
        self.positions = positions  # (68, 2) x, y in the model's input pixels

    def forward(self, images):
        n, _, h, w = images.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        d2 = (xs - self.positions[:, 0, None, None]) ** 2 + (ys - self.positions[:, 1, None, None]) ** 2
        return (-30.0 - d2 / 8.0).float().expand(n, -1, -1, -1)  # logsigmoid ~ the parabola itself


def test_predict_on_a_spine_model_gives_the_angles_in_the_images_pixels(spine_run, tmp_path, monkeypatch):
    run = spine_run[1]["run_dir"]
    h, w = 600, 250  # resized anisotropically: x by 128/250, y by 384/600
    corners = torch.from_numpy(_tilted_spine(h))
    net_h, net_w = 384, 128  # the checkpoint's input size is 96 x 32; a finer grid keeps the peaks apart
    ckpt = torch.load(run / "checkpoint_best.pt", weights_only=True)
    ckpt["config"]["image_size"] = [net_h, net_w]
    torch.save(ckpt, tmp_path / "spine.pt")
    in_net = (corners + 0.5) * torch.tensor([net_w / w, net_h / h], dtype=torch.float64) - 0.5
    monkeypatch.setattr(predictor, "model_from_checkpoint", lambda ckpt, device: KnownSpine(in_net))
    PIL.new("L", (w, h), 90).save(tmp_path / "spine.png")
    (entry,) = predict.main(["--checkpoint", str(tmp_path / "spine.pt"), str(tmp_path / "spine.png"), "--out",
                             str(tmp_path / "out"), "--no-progress"])
    assert (torch.tensor(entry["landmarks_px"], dtype=torch.float64) - corners).abs().max() < 0.05
    expected = metrics.cobb_angles(corners, h)
    assert [entry["cobb_angles"][k] for k in cobb.ANGLE_NAMES] == pytest.approx(expected.tolist(), abs=0.05)
    assert expected[0] > 10  # a real curve, and not what the model's own pixels would give
    assert abs(float(metrics.cobb_angles(in_net, net_h)[0]) - float(expected[0])) > 1.0
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert saved[0]["cobb_angles"] == entry["cobb_angles"]
    # The overlay: vertebra outlines (red) and the main angle's mid-lines (cyan).
    with PIL.open(entry["overlay"]) as image:
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert (0, 220, 255) in colours and (255, 60, 60) in colours
    # CSV: the image's angles on each of its 68 rows.
    predict.main(["--checkpoint", str(tmp_path / "spine.pt"), str(tmp_path / "spine.png"), "--out",
                  str(tmp_path / "csv"), "--format", "csv", "--no-progress", "--no-overlay"])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "csv" / "predictions.csv").read_text())))
    assert len(rows) == 68 and list(rows[0])[-3:] == list(predictor.COBB_CSV_FIELDS)
    assert {float(r["cobb_main"]) for r in rows} == {entry["cobb_angles"]["main"]}
    assert math.isclose(float(rows[5]["x"]), entry["landmarks_px"][5][0])


def test_tensorboard_overlays_and_heatmaps_work_with_68_landmarks(spine_run):
    """Issue 28: the TensorBoard images of a spine run (68 landmarks) are written every epoch."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = spine_run[0]
    train.main(TINY + ["--data", "spine", "--root", str(root / "copy"), "--epochs", "1", "--tensorboard",
                       "--out", str(root / "tb")])
    (events,) = (root / "tb" / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"val/overlays", "val/heatmaps"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("val/overlays")] == [1]
    assert "val/mre" in acc.Tags()["scalars"]
