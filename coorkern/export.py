"""Export a trained detector for programs without the training code: ``coorkern export --checkpoint
RUN_OR_FILE [--format {onnx,torchscript,pt2}] [--out FILE]``.

* ``onnx`` (default): standard operators only (the fused coordinate attention lowered to
  ``GridSample`` + ``MatMul``/``Softmax``); input ``images`` ``(batch, 1, H, W)``, output ``logits``.
* ``torchscript``: a traced module that calls the fused ops (``torch.ops.coorkern.*``; the C++
  kernels on CPU); a libtorch program runs it after loading ``libcoorkern_ops.so``.
* ``pt2``: ``torch.export`` + an AOTInductor package (torch >= 2.6; a C++ compiler on CPU),
  the fused ops kept as on TorchScript on CPU, the Triton kernels compiled in on CUDA.

The torchscript and pt2 models take the grey image resized to the model's input size and
return ``(coords, confidence, logits)`` (normalization and heatmap decoding inside); each is
loaded back and checked against the eager model before the command succeeds.  The
exporters are in :mod:`coorkern.engine.export`; ``coorkern.export.to_onnx`` is the ONNX one.
examples/cpp/detect runs the torchscript and pt2 files; docs/deploying.md compares the formats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .engine.checkpoints import best_checkpoint_or_error, model_from_checkpoint
from .engine.cli_args import HelpFormatter, description, positive_int, prog
from .engine.export import (DEFAULT_OPSET, FORMATS, ExportMismatchError, ExportUnsupportedError, export_model,
                            onnx_op_types, to_onnx)

__all__ = ["to_onnx", "onnx_op_types", "build_parser", "main", "DEFAULT_NAMES"]

DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("export"), description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    p.add_argument("--format", choices=FORMATS, default="onnx", dest="fmt",
                   help="onnx: standard operators only; torchscript, pt2: the fused coorkern ops kept")
    p.add_argument("--out", help="file to write (default: model.onnx, model.torchscript.pt or model.pt2 next to "
                                 "the checkpoint)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size of the graph (default: the training size)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="fixed batch size of the graph")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="device the torchscript/pt2 model runs on (pt2 packages are compiled for it)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (>= 16 for GridSample)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    """``coorkern export``: returns the path of the written file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = best_checkpoint_or_error(parser, args.checkpoint)
    if args.opset < 16:
        parser.error("--opset must be >= 16 (GridSample)")
    image_size = args.image_size or ckpt["config"]["image_size"]
    out = Path(args.out) if args.out else Path(ckpt["path"]).parent / DEFAULT_NAMES[args.fmt]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = export_model(model_from_checkpoint(ckpt), out, args.fmt, image_size, batch_size=args.batch_size,
                              device=args.device, opset_version=args.opset)
    except ImportError as exc:
        parser.error(f"ONNX export needs the onnx and onnxscript packages ({exc}): pip install onnx onnxscript")
    except (ExportUnsupportedError, ValueError) as exc:
        parser.error(str(exc))
    except ExportMismatchError as exc:
        parser.exit(1, f"{parser.prog}: export check failed: {exc}\n")
    shape = (args.batch_size, ckpt["model_config"].get("in_channels", 1), *image_size)
    if args.fmt == "onnx":
        print(f"wrote {report['path']}: input 'images' {shape}, output 'logits'")
    else:
        ops = ", ".join(report["coorkern_ops"]) or "none (this model has no fused op)"
        print(f"wrote {report['path']} ({args.fmt}, {args.device}): input image {shape}, outputs coords, confidence, "
              f"logits; fused ops kept: {ops}; matches the eager model (max logit error "
              f"{report['max_logit_error']:.2g})")
    return report["path"]


if __name__ == "__main__":
    main(sys.argv[1:])
