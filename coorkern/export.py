"""Export a trained detector to ONNX (standard operators only): ``coorkern export --checkpoint
RUN_OR_FILE [--out model.onnx]``.

The graph has a fixed input ``images`` of shape ``(batch, 1, H, W)`` (the training size
unless ``--image-size``) and one output ``logits``; the fused coordinate attention is
lowered to ONNX ``GridSample`` + ``MatMul``/``Softmax``.  The exporter is
:func:`coorkern.engine.onnx_export.to_onnx`, also available here as ``coorkern.export.to_onnx``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .engine.checkpoints import best_checkpoint_or_error, model_from_checkpoint
from .engine.cli_args import HelpFormatter, description, prog
from .engine.onnx_export import DEFAULT_OPSET, onnx_op_types, to_onnx

__all__ = ["to_onnx", "onnx_op_types", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("export"), description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    p.add_argument("--out", help="ONNX file to write (default: model.onnx next to the checkpoint)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size of the graph (default: the training size)")
    p.add_argument("--batch-size", type=int, default=1, help="fixed batch size of the graph")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (>= 16 for GridSample)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    """``coorkern export``: returns the path of the written ONNX file."""
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
    main(sys.argv[1:])
