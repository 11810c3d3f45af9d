"""ONNX export of the reference detector (coorkern.export.to_onnx), checked with onnxruntime.

Needs the ``onnx``, ``onnxscript`` and ``onnxruntime`` packages (the ``test`` extra);
skipped with the reason when they are missing.
"""

from __future__ import annotations

import pytest
import torch

from coorkern.export import onnx_op_types, to_onnx
from coorkern.models import CoorDetector

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the 'onnx' package (pip install coorkern[test])")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs 'onnxscript' (pip install coorkern[test])")
ort = pytest.importorskip("onnxruntime", reason="running the exported file needs 'onnxruntime' (pip install coorkern[test])")


def run_onnx(path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    return torch.from_numpy(logits)


@pytest.mark.parametrize("transformer, sample", [("coor", "qk"), ("coor", "kv"), ("vanilla", "qk")])
def test_onnx_export_runs_in_onnxruntime_and_matches_pytorch(tmp_path, transformer, sample):
    model = CoorDetector(base_channels=2, num_landmarks=4, transformer=transformer, sample=sample)
    model.train()  # to_onnx must export the eval-mode graph and give the mode back
    path = to_onnx(model, tmp_path / "detector.onnx", (64, 80))
    assert model.training
    onnx.checker.check_model(str(path))

    ops = onnx_op_types(path)
    if transformer == "coor":
        assert "GridSample" in ops
    assert {"MatMul", "Softmax"} <= ops or "Attention" in ops  # attention as standard ONNX ops
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ops in the graph: {domains}"

    images = torch.randn(1, 1, 64, 80)
    model.eval()
    with torch.no_grad():
        expected = model(images)  # default backend: the fused op
    torch.testing.assert_close(run_onnx(path, images), expected, atol=1e-4, rtol=1e-4)


def test_to_onnx_rejects_a_bad_image_size(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        to_onnx(CoorDetector(base_channels=2), tmp_path / "x.onnx", (64,))
