"""The public names and the rooms' rules of the package layout (docs/architecture.md)."""

import ast
import importlib
from pathlib import Path

import pytest
import torch

import coorkern

PUBLIC = ["BACKENDS", "BackendUnavailableError", "CentralLoss", "CoorAttention", "backend", "central_loss",
          "central_loss_from_landmarks", "cmake_prefix_path", "coor_attention", "cpp_available", "heatmap_loss",
          "reference"]
COMMANDS = ["train", "evaluate", "predict", "experiments", "export", "info"]
PACKAGE = Path(coorkern.__file__).resolve().parent


def test_public_names_are_exported_and_usable():
    assert sorted(coorkern.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(coorkern, name) is not None, name
    logits = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    landmarks = torch.tensor([[[1.0, 2.0], [4.0, 3.0]]], dtype=torch.float64)
    value = coorkern.central_loss_from_landmarks(logits, landmarks, sigma=1.5)
    expected = coorkern.reference.central_loss_from_landmarks(logits, landmarks, sigma=1.5)
    torch.testing.assert_close(value, expected)
    from coorkern.models import CoorDetector, TRANSFORMER_KINDS  # noqa: F401
    from coorkern.export import to_onnx  # noqa: F401


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_module_has_main_and_a_parser(command):
    module = importlib.import_module(f"coorkern.{command}")
    assert callable(module.main) and callable(module.build_parser)


@pytest.mark.parametrize("command", COMMANDS + ["cli"])
def test_no_command_imports_another_command(command):
    tree = ast.parse((PACKAGE / f"{command}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                imported.update(alias.name for alias in node.names)
            else:
                imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("coorkern."):
            imported.add(node.module.split(".")[1])
    assert not (imported & (set(COMMANDS) - {command})), imported
