"""Evaluate a trained detector: ``python -m coorkern.evaluate --checkpoint PATH [--data NAME --root PATH]``.

Prints an MRE/SDR table per landmark (with the mean-shape baseline stored in the
checkpoint side by side) and the empirical coverage of the checkpoint's conformal
uncertainty radii; writes ``metrics.json`` (+ per-image predictions), ``per_landmark.png``
and overlay PNGs of predicted (red, with the radius circle) vs true (green) landmarks to
``--out``.  Spine data are measured in pixels of the original images (the SDR radii
10-40 px were chosen there), and the report adds the Cobb angles of the predicted corners:
SMAPE and the mean absolute error of each of the three angles (``cobb`` in
``metrics.json``, the angles per image in its ``predictions``).  ``--split carved``
evaluates the validation part the run carved from its training split.  The measuring is
:func:`coorkern.engine.inference.evaluate_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import metrics
from .engine.cli_args import HelpFormatter, description, positive_int, prog
from .engine.cobb import format_cobb
from .engine.inference import add_evaluation_options, evaluate_checkpoint, evaluation_setup_or_error, format_coverage

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("evaluate"), description=description(__doc__),
                                formatter_class=HelpFormatter)
    add_evaluation_options(p)
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="SDR radii in mm (px without spacing); default per dataset")
    p.add_argument("--per-landmark", action=argparse.BooleanOptionalAction, default=True,
                   help="print the per-landmark table")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per inference batch")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype for inference")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval_<split>)")
    p.add_argument("--overlays", type=int, default=8, help="number of overlay PNGs to write")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Evaluate and print; returns the report written to ``metrics.json``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt, target, device = evaluation_setup_or_error(parser, args)
    out = Path(args.out) if args.out else Path(ckpt["path"]).parent / f"eval_{target.split}"
    report = evaluate_checkpoint(ckpt, target, out, thresholds=args.thresholds, device=device,
                                 batch_size=args.batch_size, amp=args.amp, overlays=args.overlays)
    pixels = ", pixels of the original images" if "pixels" in report["metrics"] else ""
    selected = f", selected on {report['selection']}" if report["selection"] else ""
    print(f"{target.name} / {target.split}: {len(target.dataset)} images, checkpoint {ckpt['path']} "
          f"(epoch {ckpt['epoch'] + 1}{selected}{pixels})")
    print(metrics.format_table(report["metrics"], report["baseline"], per_landmark=args.per_landmark))
    if "cobb" in report:
        print(format_cobb(report["cobb"]))
    if report["conformal"] is not None:
        print(format_coverage(report["conformal"]))
    elif "conformal" in ckpt:
        print("conformal radii not evaluated: --image-size differs from the training size they were calibrated at")
    print(f"wrote {out / 'metrics.json'}, {out / 'per_landmark.png'} and {min(args.overlays, len(target.dataset))} "
          f"overlays in {out / 'overlays'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
