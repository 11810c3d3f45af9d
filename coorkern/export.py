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

from ._backend import backend

__all__ = ["to_onnx", "onnx_op_types"]

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


def build_parser():
    import argparse

    from ._runs import HelpFormatter, prog

    p = argparse.ArgumentParser(prog=prog("export"), formatter_class=HelpFormatter,
                                description="Export a trained detector to ONNX (standard operators only): "
                                            "coorkern export --checkpoint RUN_OR_FILE [--out model.onnx]")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    p.add_argument("--out", help="ONNX file to write (default: model.onnx next to the checkpoint)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size of the graph (default: the training size)")
    p.add_argument("--batch-size", type=int, default=1, help="fixed batch size of the graph")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (>= 16 for GridSample)")
    return p


def main(argv=None) -> str:
    """``coorkern export``: returns the path of the written ONNX file."""
    from pathlib import Path

    from ._runs import best_checkpoint_or_error, model_from_checkpoint

    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = best_checkpoint_or_error(parser, args.checkpoint)
    if args.batch_size < 1 or args.opset < 16:
        parser.error("--batch-size must be >= 1 and --opset >= 16")
    image_size = args.image_size or ckpt["config"]["image_size"]
    out = Path(args.out) if args.out else Path(ckpt["path"]).parent / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = to_onnx(model_from_checkpoint(ckpt), out, image_size, batch_size=args.batch_size,
                       opset_version=args.opset)
    except ImportError as exc:
        parser.error(f"ONNX export needs the onnx and onnxscript packages ({exc}): pip install onnx onnxscript")
    print(f"wrote {path}: input 'images' {(args.batch_size, 1, *image_size)}, output 'logits'")
    return path


if __name__ == "__main__":
    main()
