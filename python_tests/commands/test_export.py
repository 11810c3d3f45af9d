"""``coorkern export``: ONNX with standard operators only (checked with onnxruntime), TorchScript
keeping the fused ops (checked against the eager model), the export's own check failing
loudly, and the clear errors of combinations that cannot work here.

The pt2 format (AOTInductor) is exercised end to end, from the command to the C++ program,
by python_tests/cpp/test_detect_example.py: its compile takes ~80 s here, so it is done
once there; its error paths are tested here.  The ONNX tests need the ``onnx``,
``onnxscript`` and ``onnxruntime`` packages (the ``test`` extra) and skip with the reason
when they are missing.
"""

from __future__ import annotations

import re

import pytest
import torch

from coorkern import export
from coorkern.engine import export as exporter
from coorkern.engine.checkpoints import save_checkpoint
from coorkern.export import onnx_op_types, to_onnx
from coorkern.models import CoorDetector
from coorkern.ops._runtime import extension

IMAGE_SIZE = (64, 80)


def tiny_detector(transformer: str = "coor", sample: str = "qk") -> CoorDetector:
    torch.manual_seed(0)
    return CoorDetector(base_channels=2, num_landmarks=4, transformer=transformer, sample=sample)


# ---------------------------------------------------------------------------
# ONNX


def onnx_modules():
    onnx = pytest.importorskip("onnx", reason="ONNX export tests need the 'onnx' package (pip install coorkern[test])")
    pytest.importorskip("onnxscript",
                        reason="torch.onnx.export(dynamo=True) needs 'onnxscript' (pip install coorkern[test])")
    ort = pytest.importorskip("onnxruntime",
                              reason="running the exported file needs 'onnxruntime' (pip install coorkern[test])")
    return onnx, ort


@pytest.mark.parametrize("transformer, sample", [("coor", "qk"), ("coor", "kv"), ("vanilla", "qk")])
def test_onnx_export_runs_in_onnxruntime_and_matches_pytorch(tmp_path, transformer, sample):
    onnx, ort = onnx_modules()
    model = tiny_detector(transformer, sample)
    model.train()  # to_onnx must export the eval-mode graph and give the mode back
    path = to_onnx(model, tmp_path / "detector.onnx", IMAGE_SIZE)
    assert model.training
    onnx.checker.check_model(str(path))

    ops = onnx_op_types(path)
    if transformer == "coor":
        assert "GridSample" in ops
    assert {"MatMul", "Softmax"} <= ops or "Attention" in ops  # attention as standard ONNX ops
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ops in the graph: {domains}"

    images = torch.randn(1, 1, *IMAGE_SIZE)
    model.eval()
    with torch.no_grad():
        expected = model(images)  # default backend: the fused op
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)


def test_to_onnx_rejects_a_bad_image_size(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        to_onnx(CoorDetector(base_channels=2), tmp_path / "x.onnx", (64,))


# ---------------------------------------------------------------------------
# TorchScript: the fused op kept


needs_cpp = pytest.mark.skipif(not extension.cpp_available(), reason="the C++ library is not built")


@needs_cpp
def test_torchscript_keeps_the_fused_op_and_matches_eager(tmp_path):
    model = tiny_detector().train()
    report = exporter.to_torchscript(model, tmp_path / "detector.pt", IMAGE_SIZE)
    assert model.training  # the caller's mode is given back
    assert report["coorkern_ops"] == ["coorkern::coor_attention"]

    extra = {exporter.METADATA_FILE: ""}
    loaded = torch.jit.load(report["path"], _extra_files=extra)
    kinds = {node.kind() for node in loaded.inlined_graph.nodes()}
    assert "coorkern::coor_attention" in kinds and "aten::grid_sampler" not in kinds  # not decomposed
    metadata = extra[exporter.METADATA_FILE].decode()
    assert "coorkern_format=coorkern-detector-v1\n" in metadata and "image_height=64\nimage_width=80\n" in metadata

    image = torch.rand(1, 1, *IMAGE_SIZE)
    coords, confidence, logits = loaded(image)
    model.eval()
    with torch.no_grad():
        expected = model(exporter.data_mod.normalize(image))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    want_coords, want_confidence = exporter.metrics.decode_heatmaps(expected)
    torch.testing.assert_close(coords, want_coords, atol=1e-3, rtol=0)
    torch.testing.assert_close(confidence, want_confidence, atol=1e-5, rtol=0)


def perturbed_loader(monkeypatch, output: int, delta: float) -> None:
    """Make the export's load-back return output ``output`` (0 coords, 2 logits) shifted by ``delta``."""
    real_load = torch.jit.load

    def load(*args, **kwargs):
        module = real_load(*args, **kwargs)

        def run(image):
            outputs = list(module(image))
            outputs[output] = outputs[output] + delta
            return tuple(outputs)

        return run

    monkeypatch.setattr(torch.jit, "load", load)


@needs_cpp
@pytest.mark.parametrize("output, delta, message", [(2, 1e-2, "logits differ"), (0, 0.1, "not the decoding")])
def test_the_export_check_fails_loudly_on_a_mismatch(tmp_path, monkeypatch, output, delta, message):
    perturbed_loader(monkeypatch, output, delta)
    with pytest.raises(exporter.ExportMismatchError, match=message):
        exporter.to_torchscript(tiny_detector(), tmp_path / "detector.pt", IMAGE_SIZE)
    assert not (tmp_path / "detector.pt").exists()  # no unusable file left behind


@needs_cpp
def test_the_export_check_tolerates_float_noise(tmp_path, monkeypatch):
    perturbed_loader(monkeypatch, 2, 5e-5)  # within LOGIT_TOLERANCE; decoding the same logits
    report = exporter.to_torchscript(tiny_detector(), tmp_path / "detector.pt", IMAGE_SIZE)
    assert report["max_logit_error"] == pytest.approx(5e-5, rel=1e-2)


# ---------------------------------------------------------------------------
# The command


@pytest.fixture
def checkpoint(tmp_path) -> str:
    model = tiny_detector()
    config = {"model": model.config, "image_size": list(IMAGE_SIZE), "data": "synthetic"}
    return str(save_checkpoint(tmp_path / "run" / "checkpoint_best.pt", model=model, config=config, epoch=0))


@needs_cpp
def test_command_writes_a_checked_torchscript_file_next_to_the_checkpoint(checkpoint, tmp_path, capsys):
    path = export.main(["--checkpoint", str(tmp_path / "run"), "--format", "torchscript"])
    assert path == str(tmp_path / "run" / "model.torchscript.pt")
    out = capsys.readouterr().out
    assert "fused ops kept: coorkern::coor_attention" in out and "matches the eager model" in out
    coords, confidence, logits = torch.jit.load(path)(torch.rand(1, 1, *IMAGE_SIZE))
    assert coords.shape == (1, 4, 2) and confidence.shape == (1, 4) and logits.shape == (1, 4, *IMAGE_SIZE)


@needs_cpp
def test_command_exits_1_when_the_check_fails(checkpoint, monkeypatch, capsys):
    perturbed_loader(monkeypatch, 2, 1.0)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", checkpoint, "--format", "torchscript"])
    assert exit_info.value.code == 1
    assert "export check failed" in capsys.readouterr().err


def no_compiler():
    raise RuntimeError("no working C++ compiler found in ('g++',)")


@pytest.mark.parametrize("fmt, patch, message", [
    ("pt2", "no aoti", "torch._inductor.aoti_compile_and_package"),
    ("pt2", "no compiler", "no C++ compiler was found"),
    ("pt2", "no library", "libcoorkern_ops.so"),
    ("torchscript", "no library", "libcoorkern_ops.so"),
])
def test_unsupported_combinations_name_what_is_missing(checkpoint, monkeypatch, capsys, fmt, patch, message):
    if patch == "no aoti":
        monkeypatch.delattr(torch._inductor, "aoti_compile_and_package")
    elif patch == "no compiler":
        monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    else:
        monkeypatch.setattr(extension, "cpp_available", lambda: False)
    with pytest.raises(exporter.ExportUnsupportedError, match=re.escape(message)):
        exporter.export_model(tiny_detector(), "unused.pt", fmt, IMAGE_SIZE)
    with pytest.raises(SystemExit) as exit_info:  # the command: a usage error naming the same
        export.main(["--checkpoint", checkpoint, "--format", fmt])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message of a machine without CUDA")
def test_cuda_export_without_cuda_says_so():
    with pytest.raises(exporter.ExportUnsupportedError, match="needs a CUDA device"):
        exporter.export_model(tiny_detector(), "unused.pt", "torchscript", IMAGE_SIZE, device="cuda")


def test_export_model_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="fmt must be one of"):
        exporter.export_model(tiny_detector(), "unused.pt", "tflite", IMAGE_SIZE)
