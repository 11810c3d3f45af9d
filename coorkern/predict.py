"""Detect landmarks: ``coorkern predict --checkpoint RUN_OR_FILE INPUT [INPUT ...]`` (or ``python -m coorkern.predict``).

INPUTs are image files (BMP/PNG/JPEG/TIFF, DICOM, MetaImage, NRRD, NIfTI), folders (their
files with those extensions) or glob patterns, of any size: each image is resized to the
model's input and the landmarks mapped back to its own pixels.  Per image and landmark:
``x, y`` in input pixels, in mm when the pixel spacing is known (``--spacing``; for a hand
model 50 mm between the predicted wrist landmarks, the data set's convention; else the
file header's spacing, e.g. DICOM PixelSpacing; else the spacing all the model's
training images shared, e.g. 0.1 mm for ISBI 2015), the heatmap peak probability as
confidence, and the radius within which the true landmark lies with the checkpoint's
coverage (split-conformal, calibrated on the training run's validation split).  Writes ``<out>/predictions.json`` or ``.csv``
(``--format``, also printed) and an overlay PNG per image with the radius circles.
Unreadable inputs are reported and skipped; the exit code is then 1.  A spine model adds
each image's three Cobb angles (degrees, main curve first; from the predicted corners in the
image's own pixels): ``cobb_angles`` ``{"main", "second", "third"}`` in the JSON entry, the
columns ``cobb_main, cobb_second, cobb_third`` on each of the image's CSV rows; its overlay
draws the vertebrae as quadrilaterals, the two mid-lines of the main angle and its value.
The predicting is :mod:`coorkern.engine.predictor`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .engine.checkpoints import best_checkpoint_or_error
from .engine.cli_args import HelpFormatter, description, positive_float, positive_int, prog
from .engine.inference import device_or_error
from .engine.predictor import Predictor, expand_inputs, predict_files, write_predictions

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("predict"), description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files (BMP/PNG/JPEG/TIFF, DICOM, MHA/MHD, NRRD, NIfTI), folders or glob patterns")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    p.add_argument("--spacing", type=positive_float, nargs="+", metavar="MM",
                   help="pixel spacing of the input images in mm (one value, or x y); overrides the files' own")
    p.add_argument("--format", choices=("json", "csv"), default="json",
                   help="output written to <out>/predictions.<format> and printed: json (one entry per image with "
                        "a record per landmark) or csv (one row per image and landmark)")
    p.add_argument("--out", default="predictions", help="folder for predictions.json/.csv and the overlay PNGs")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype for inference")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr (on a terminal only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Predict every input; returns the per-image entries.  Exits with code 1 after reporting unreadable inputs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spacing is not None and len(args.spacing) not in (1, 2):
        parser.error("--spacing takes one or two positive numbers (mm per pixel in x [and y])")
    ckpt = best_checkpoint_or_error(parser, args.checkpoint)
    predictor = Predictor(ckpt, device_or_error(parser, args.device), amp=args.amp, spacing=args.spacing,
                          overlay_dir=None if args.no_overlay else args.out)
    if predictor.calibration is None:
        print(f"note: {ckpt['path']} holds no calibrated uncertainty radii (a checkpoint_best.pt of a finished "
              "run does); predicting without them", file=sys.stderr)
    paths, failures = expand_inputs(args.images)
    for name, reason in failures:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    results = predict_files(predictor, paths, args.batch_size, args.progress, failures)
    if results:
        sys.stdout.write(write_predictions(results, args.out, args.format))
    if failures:
        print(f"error: {len(failures)} input(s) could not be read ({', '.join(n for n, _ in failures)}); "
              f"{len(results)} image(s) predicted", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
