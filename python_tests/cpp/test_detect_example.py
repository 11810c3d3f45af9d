"""examples/cpp/detect: a libtorch program that runs a detector exported by ``coorkern export``
(TorchScript, and an AOTInductor ``.pt2`` package) on a BMP file and prints the landmarks as
``coorkern predict --format csv`` does.  Built once per session by the ``cmake_build``
fixture (~30 s); its landmarks are compared with ``coorkern predict`` on the same image and
checkpoint (within 0.5 px; they agree to ~0.001 px), and bad input must give one line on
stderr and exit status 1, never an abort.

The checkpoint's detector has random weights at 1/100 of their initial scale plus a path that
carries the input to the logits (the stem's and the final stage's channel 0, then the
head), so its heatmaps peak at the bright dot of the test image -- no near-ties that a
different kernel order could flip -- while the coordinate attention still runs on real
values.  The pt2 test compiles a package with AOTInductor: about 80 s on the 2-core CI
machine, the one slow test of the pair (docs/deploying.md).
"""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from coorkern import export, predict
from coorkern.engine.checkpoints import save_checkpoint
from coorkern.models import CoorDetector
from support.paths import REPO_ROOT

PIL = pytest.importorskip("PIL.Image")

DETECT_DIR = os.path.join(str(REPO_ROOT), "examples", "cpp", "detect")
NET_SIZE = (64, 80)  # H, W of the model's input
IMAGE_SIZE = (120, 150)  # H, W of the test image: 1.9 x 1.9 image pixels per model pixel
DOT = (37.3, 81.6)  # (x, y) in image pixels
TOLERANCE_PX = 0.5


def peaked_detector() -> CoorDetector:
    """A coordinate-attention detector whose logits peak at the input's brightest point."""
    torch.manual_seed(0)
    model = CoorDetector(base_channels=2, num_landmarks=3, transformer="coor")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                for param in module.parameters():
                    param.mul_(0.01)
        # Channel 0 through the stem and the final stage (its input: cat(up-sampled, stem output)).
        skip_channel = model.final.fuse[0][0].in_channels - model.level_channels[0]
        for conv, channel in ((model.stem[0][0], 0), (model.stem[1][0], 0), (model.final.fuse[0][0], skip_channel),
                              (model.final.fuse[1][0], 0)):
            conv.weight[0, channel, 1, 1] += 1.0
        model.head.weight[:, 0] += 3.0  # after the final stage's two CBAM gates of ~0.5: peak confidence ~0.7
        model.head.bias.fill_(-6.0)
    return model.eval()


def write_bmp(path, pixels: np.ndarray) -> str:
    PIL.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The checkpoint, the dot image and ``coorkern predict``'s CSV rows for it."""
    folder = tmp_path_factory.mktemp("detect")
    model = peaked_detector()
    config = {"model": model.config, "image_size": list(NET_SIZE), "data": "synthetic"}
    checkpoint = str(save_checkpoint(folder / "checkpoint.pt", model=model, config=config, epoch=0))
    h, w = IMAGE_SIZE
    rows, cols = np.mgrid[0:h, 0:w]
    dot = np.clip(1 - ((cols - DOT[0]) ** 2 + (rows - DOT[1]) ** 2) / 14.0**2, 0, None)
    image = write_bmp(folder / "dot.bmp", np.round(dot * 255).astype(np.uint8))
    predict.main(["--checkpoint", checkpoint, image, "--format", "csv", "--device", "cpu", "--no-overlay",
                  "--no-progress", "--out", str(folder / "predicted")])
    with open(folder / "predicted" / "predictions.csv") as f:
        expected = list(csv.DictReader(f))
    return {"folder": folder, "checkpoint": checkpoint, "image": image, "expected": expected}


@pytest.fixture(scope="module")
def detect_binary(cmake_build) -> str:
    return os.path.join(cmake_build(DETECT_DIR), "coorkern_detect")


def export_model(case, fmt: str, name: str, *extra: str) -> str:
    return export.main(["--checkpoint", case["checkpoint"], "--format", fmt, "--out", str(case["folder"] / name),
                        *extra])


@pytest.fixture(scope="module")
def torchscript_model(case) -> str:
    return export_model(case, "torchscript", "detector.torchscript.pt")


def run_detect(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)


def assert_matches_predict(proc: subprocess.CompletedProcess, case) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert list(rows[0]) == ["image", "landmark", "x", "y", "confidence"]  # predict's columns, in its order
    expected = case["expected"]
    assert [(r["image"], r["landmark"]) for r in rows] == [(r["image"], r["landmark"]) for r in expected]
    got = torch.tensor([[float(r["x"]), float(r["y"])] for r in rows])
    want = torch.tensor([[float(r["x"]), float(r["y"])] for r in expected])
    assert (got - want).abs().max() <= TOLERANCE_PX, (got, want)
    assert (want - torch.tensor(DOT)).abs().max() < 0.5, want  # the model does find the dot
    confidence = torch.tensor([[float(r["confidence"]) for r in rs] for rs in (rows, expected)])
    assert (confidence[0] - confidence[1]).abs().max() <= 2e-4


def test_torchscript_detector_matches_coorkern_predict(detect_binary, torchscript_model, case):
    assert_matches_predict(run_detect(detect_binary, torchscript_model, case["image"]), case)


def test_pt2_package_keeps_the_fused_op_and_matches_coorkern_predict(detect_binary, case):
    """Slow (~80 s: the AOTInductor compile).  The package calls coorkern::coor_attention through
    the dispatcher (an extern kernel of the generated wrapper), which resolves in C++ only
    because the program keeps libcoorkern_ops.so loaded."""
    package = export_model(case, "pt2", "detector.pt2")
    with zipfile.ZipFile(package) as archive:
        wrapper = [archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.json")]
    assert wrapper and '"target": "coorkern::coor_attention"' in wrapper[0]
    assert_matches_predict(run_detect(detect_binary, package, case["image"]), case)
    # More threads than the exporting process had: the package sizes its OpenMP buffers at run time.
    assert_matches_predict(run_detect(detect_binary, package, case["image"], "--threads", "4"), case)


def _bmp_header(width: int, height: int, bits: int = 8, pixel_bytes: int = 0) -> bytes:
    """A BITMAPINFOHEADER BMP with a grey palette and ``pixel_bytes`` of zero pixels."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + pixel_bytes, 0, 0, offset) + info + palette + bytes(pixel_bytes)


@pytest.mark.parametrize("what, expected", [
    ("missing image", "cannot open the image file"),
    ("colour image", "24-bit colour image (3 channels)"),
    ("zero width", "invalid image size 0x10"),
    ("truncated pixels", "truncated pixel data"),
    ("missing model", "model file not found"),
    ("checkpoint as model", "not a TorchScript model"),
    ("other TorchScript model", "not a coorkern detector export"),
    ("junk pt2", "not a loadable AOTInductor package"),
])
def test_bad_input_gets_one_line_and_exit_status_1(detect_binary, torchscript_model, case, tmp_path, what, expected):
    model, image = torchscript_model, case["image"]
    if what == "missing image":
        image = str(tmp_path / "missing.bmp")
    elif what == "colour image":
        image = write_bmp(tmp_path / "colour.bmp", np.zeros((12, 10, 3), np.uint8))
    elif what in ("zero width", "truncated pixels"):
        image = str(tmp_path / "bad.bmp")
        with open(image, "wb") as f:
            f.write(_bmp_header(0, 10) if what == "zero width" else _bmp_header(16, 16, pixel_bytes=100))
    elif what == "missing model":
        model = str(tmp_path / "missing.pt2")
    elif what == "checkpoint as model":
        model = case["checkpoint"]
    elif what == "other TorchScript model":
        model = str(tmp_path / "linear.pt")
        torch.jit.script(torch.nn.Linear(2, 2)).save(model)
    else:
        model = str(tmp_path / "junk.pt2")
        with open(model, "wb") as f:
            f.write(b"not a zip archive")
    proc = run_detect(detect_binary, model, image)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coorkern_detect: error: "), proc.stderr
    assert expected in lines[0]


def test_usage_error_exits_2(detect_binary):
    proc = run_detect(detect_binary, "model-only.pt2")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA run needs a CUDA device")
@pytest.mark.parametrize("fmt, name", [("torchscript", "cuda.torchscript.pt"), ("pt2", "cuda.pt2")])
def test_detector_runs_on_cuda(detect_binary, case, fmt, name):
    model = export_model(case, fmt, name, "--device", "cuda")
    assert_matches_predict(run_detect(detect_binary, model, case["image"]), case)
