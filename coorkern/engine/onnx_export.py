"""ONNX export of coorkern models with the fused ops lowered to standard ONNX operators.

The fused coordinate attention is a custom op (``torch.ops.coorkern.coor_attention``)
that no ONNX runtime knows.  Its eager reference, :func:`coorkern.reference.coor_attention`,
is ``F.grid_sample`` + ``F.scaled_dot_product_attention``, which the exporter lowers to
ONNX ``GridSample`` + ``MatMul``/``Softmax``.  So :func:`to_onnx` traces the model with
the backend forced to ``"reference"``: the exported graph has the same semantics as
the fused op (the tests compare both against onnxruntime) and only standard operators.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch

from ..ops._runtime.backend import backend

__all__ = ["to_onnx", "onnx_op_types", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18  # GridSample needs opset >= 16; 18 is the exporter's well-tested default


def to_onnx(
    model: torch.nn.Module,
    path: Union[str, os.PathLike],
    image_size: Sequence[int],
    *,
    batch_size: int = 1,
    opset_version: int = DEFAULT_OPSET,
) -> str:
    """Export ``model`` (for inference, in eval mode) to the ONNX file ``path``; return the path.

    ``image_size`` is ``(H, W)``; the graph has a fixed input of shape
    ``(batch_size, model.in_channels, H, W)`` named ``images`` and one output ``logits``.
    The model's training mode is restored afterwards.
    """
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {tuple(image_size)!r}")
    height, width = (int(s) for s in image_size)
    in_channels = getattr(model, "in_channels", 1)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    example = torch.zeros(batch_size, in_channels, height, width, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        # The reference backend turns each fused op into grid_sample + SDPA while tracing.
        with backend("reference"), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset_version,
                input_names=["images"],
                output_names=["logits"],
                verbose=False,
            )
        program.save(os.fspath(path))
    finally:
        model.train(was_training)
    return os.fspath(path)


def onnx_op_types(path: Union[str, os.PathLike]) -> set[str]:
    """The set of ONNX operator types in the file's graph, including nested functions."""
    import onnx

    proto = onnx.load(os.fspath(path))
    ops = {node.op_type for node in proto.graph.node}
    for function in proto.functions:
        ops.update(node.op_type for node in function.node)
    return ops
