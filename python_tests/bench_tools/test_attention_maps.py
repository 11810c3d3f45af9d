"""bench/attention_maps.py and coorkern.models.attention_probe on tiny detectors of every transformer kind:
the eager attention probabilities reproduce what the model computes, and the tool's JSON and figures."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from support.paths import REPO_ROOT

from coorkern.engine.checkpoints import save_checkpoint
from coorkern.models import CoorDetector, reference_grid
from coorkern.models.attention_probe import AttentionRows, capture_attention, coords_to_cells

pytest.importorskip("matplotlib")

IMAGE = 32  # the smallest input: token grids 2x2, 4x4, 8x8 and 8x8 (2x2 patches)
KINDS = {
    "coor": dict(transformer="coor"),
    "coor-groups-linear": dict(transformer="coor", coord_groups=2, position="linear"),
    "deformable-fourier": dict(transformer="deformable", position="fourier"),
    "swin": dict(transformer="swin", window_size=3),  # windows padded at 4x4 and 8x8, shifted in blocks 1 and 3
    "vanilla-sincos": dict(transformer="vanilla", vanilla_position="sincos"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for the first (and for the other processes on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("attention_maps", REPO_ROOT / "bench" / "attention_maps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(seed: int = 0, **options) -> CoorDetector:
    """A tiny detector whose attention is far from its initial state: coordinates off the grid, positions and
    Swin's bias not zero (so a probability computed without them would not reproduce the output)."""
    torch.manual_seed(seed)
    model = CoorDetector(base_channels=4, heads=(2, 2, 1, 1), offset_init_std=1.0, **options)
    for module in model.modules():
        if hasattr(module, "relative_position_bias"):
            torch.nn.init.normal_(module.relative_position_bias)
        if type(module).__name__ == "GridPosition":
            torch.nn.init.normal_(module.proj.weight)
    return model.eval()


def save_run(folder, model: CoorDetector):
    """A run folder with the model's checkpoint, as a training run on synthetic data writes it."""
    config = {"model": model.config, "data": "synthetic", "image_size": [IMAGE, IMAGE], "args": {"test_samples": 2}}
    save_checkpoint(folder / "checkpoint_best.pt", model=model, config=config, epoch=0)
    return folder


@pytest.mark.parametrize("name", list(KINDS))
def test_eager_probabilities_reproduce_the_models_attention(name):
    model = tiny_model(**KINDS[name])
    images = torch.randn(2, 1, IMAGE, IMAGE)
    logits, captures = capture_attention(model, images)
    with torch.no_grad():
        assert torch.equal(logits, model(images))  # the capture changes nothing
    assert all("attend" not in c.block.attention.__dict__ for c in captures)  # and leaves no wrapper behind
    assert [c.block.name for c in captures] == [f"decoder{s}.block0" for s in range(4)]
    assert [c.block.token_stride for c in captures] == [16, 8, 4, 4]
    assert [c.grid for c in captures] == [(2, 2), (4, 4), (8, 8), (8, 8)]
    for capture in captures:
        for item in range(2):
            rows = AttentionRows(capture, item)
            for queries, probabilities in rows.chunks(37):  # chunks that do not divide the tokens
                assert torch.allclose(probabilities.sum(-1), torch.ones(()), atol=1e-5)
                assert rows.output_error(queries, probabilities) < 1e-5, (capture.block.name, item)
        if capture.kind == "swin":  # zero outside the query's window
            height, width = capture.grid
            wh, ww, _, _ = capture.block.attention.layout(height, width)
            assert int((rows.probabilities(torch.arange(rows.tokens)) > 0).sum(-1).max()) <= wh * ww


def test_the_reproduction_check_fails_for_the_wrong_probabilities():
    """Measured at the reference grid instead of the coordinates, or without Swin's bias, the output differs."""
    _, captures = capture_attention(tiny_model(transformer="coor"), torch.randn(1, 1, IMAGE, IMAGE))
    capture = captures[2]
    grid = reference_grid(*capture.grid)
    moved = coords_to_cells(capture.coords[0], *capture.grid) - coords_to_cells(grid, *capture.grid)
    assert float(moved.abs().max()) > 0.1  # the coordinates are off the grid
    capture.coords = grid[None].expand_as(capture.coords)
    rows = AttentionRows(capture)
    assert max(rows.output_error(q, p) for q, p in rows.chunks()) > 1e-3
    _, captures = capture_attention(tiny_model(transformer="swin", window_size=3), torch.randn(1, 1, IMAGE, IMAGE))
    rows = AttentionRows(captures[1])
    rows.window = None
    assert max(rows.output_error(q, p) for q, p in rows.chunks()) > 1e-3


def check_report(report: dict, kind: str, heads=(2, 2, 1, 1)) -> None:
    assert report["transformer"] == kind and report["images"] == len(report["image_ids"])
    assert [s["name"] for s in report["stages"]] == [f"decoder{s}.block0" for s in range(4)]
    for stage, s in zip(range(4), report["stages"]):
        assert s["kind"] == kind and s["heads"] == heads[stage]
        assert s["tokens"] == s["token_grid"][0] * s["token_grid"][1]
        assert s["radius_px"] == pytest.approx(s["radius_cells"] * s["token_stride_px"])
        assert s["uniform_entropy"] == pytest.approx(math.log(s["tokens"]))
        assert 0.0 <= s["entropy"] <= s["uniform_entropy"] + 1e-5
        assert 0.0 <= s["landmark_mass"] <= 1.0 + 1e-6 and 0.0 <= s["landmark_area_share"] <= 1.0
        assert s["output_max_abs_error"] < 1e-5
        displacement = s["displacement_cells"]
        if kind in ("coor", "deformable"):
            assert 0.0 < displacement["mean"] <= displacement["p95"] <= displacement["max"]
        else:
            assert displacement is None and s["coord_groups"] is None
        assert ("window_tokens" in s) == (kind == "swin")


@pytest.mark.parametrize("name", list(KINDS))
def test_main_writes_the_json_and_one_figure_per_image(tool, tmp_path, name, capsys):
    options = KINDS[name]
    images = 2 if name == "coor" else 1
    extra = ["--stage", "1"] if name == "swin" else []
    run = save_run(tmp_path, tiny_model(**options))
    report = tool.main(["--checkpoint", str(run), "--data", "synthetic", "--split", "test", "--images",
                        str(images), "--device", "cpu", "--out", str(tmp_path / "maps")] + extra)
    assert json.loads((tmp_path / "maps" / "attention.json").read_text()) == report
    check_report(report, options["transformer"])
    assert report["images"] == images and report["radius"] == {"value": 2.0, "unit": "cells"}
    assert report["figure_block"] == ("decoder1.block0" if name == "swin" else "decoder3.block0")
    assert [s["radius_cells"] for s in report["stages"]] == [2.0] * 4
    if name == "coor-groups-linear":  # per-head coordinates where a stage has two heads
        assert [s["coord_groups"] for s in report["stages"]] == [2, 2, 1, 1]
    assert len(report["figures"]) == images
    for figure in report["figures"]:
        with open(figure, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "decoder3.block0" in capsys.readouterr().out


def test_radius_covering_the_map_gives_all_the_mass(tool, tmp_path):
    run = save_run(tmp_path, tiny_model(transformer="coor", coord_groups=2))
    report = tool.main(["--checkpoint", str(run), "--images", "1", "--radius", "10000", "--radius-unit", "pixels",
                        "--device", "cpu", "--out", str(tmp_path / "maps")])
    for s in report["stages"]:
        assert s["radius_cells"] == pytest.approx(10000 / s["token_stride_px"])
        assert s["landmark_mass"] == pytest.approx(1.0) and s["landmark_area_share"] == pytest.approx(1.0)


def test_uniform_attention_has_entropy_log_n_and_mass_equal_to_the_area(tool, tmp_path):
    model = tiny_model(transformer="vanilla")
    for module in model.modules():
        if hasattr(module, "qkv"):  # Q = K = 0: every query attends uniformly
            torch.nn.init.zeros_(module.qkv.weight)
            torch.nn.init.zeros_(module.qkv.bias)
    report = tool.main(["--checkpoint", str(save_run(tmp_path, model)), "--images", "1", "--radius", "0.5",
                        "--device", "cpu", "--out", str(tmp_path / "maps")])
    for s in report["stages"]:
        assert s["entropy"] == pytest.approx(s["uniform_entropy"], abs=1e-4)
        assert s["landmark_mass"] == pytest.approx(s["landmark_area_share"], abs=1e-5)
    assert 0.0 < report["stages"][-1]["landmark_area_share"] < 1.0  # the radius holds some tokens, not all


def test_no_attention_says_so_and_writes_empty_stages(tool, tmp_path, capsys):
    run = save_run(tmp_path, tiny_model(transformer="none"))
    report = tool.main(["--checkpoint", str(run), "--device", "cpu", "--out", str(tmp_path / "maps")])
    assert "no attention" in capsys.readouterr().out
    assert report["stages"] == [] and report["figures"] == [] and "no attention" in report["message"]
    assert json.loads((tmp_path / "maps" / "attention.json").read_text())["stages"] == []


def test_stage_without_blocks_is_refused(tool, tmp_path, capsys):
    run = save_run(tmp_path, tiny_model(transformer="coor", depths=(1, 1, 0, 1)))
    with pytest.raises(SystemExit) as exc:
        tool.main(["--checkpoint", str(run), "--stage", "2", "--device", "cpu", "--out", str(tmp_path / "maps")])
    assert exc.value.code == 2 and "decoder stage 2 has no transformer block" in capsys.readouterr().err
