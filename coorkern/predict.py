"""Detect landmarks: ``python -m coorkern.predict --checkpoint PATH IMAGE [IMAGE ...]``.

Images: BMP/PNG/JPEG/TIFF, DICOM, MetaImage, NRRD, NIfTI.  Prints JSON (one entry per
image): landmark ``(x, y)`` in the input image's pixels, in mm when the pixel spacing is
known (``--spacing``; for a hand model, 50 mm between the predicted wrist landmarks, the
data set's convention; else the file's header spacing, e.g. DICOM PixelSpacing; else
0.1 mm for a model trained on the ISBI 2015 images), and a confidence per landmark.
Writes an overlay PNG per image (``<out>/<stem>_landmarks.png``) and ``<out>/predictions.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import metrics
from ._runs import HelpFormatter, description, load_checkpoint, model_from_checkpoint, save_overlay, write_json
from .evaluate import autocast, device_or_error

__all__ = ["predict_image", "main"]

KNOWN_SPACING = {"isbi2015": 0.1}  # mm per original pixel, when the model was trained on that data set


def predict_image(model, image: torch.Tensor, image_size, device="cpu", amp=None):
    """Landmarks of one ``(1, H, W)`` image in its own pixels: ``(coords (L, 2), confidence (L,))``."""
    oh, ow = image.shape[-2:]
    h, w = image_size
    x = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = data_mod._normalize(x).to(device)
    with torch.no_grad(), autocast(device, amp):
        logits = model(x)
    coords, conf = metrics.decode_heatmaps(logits.float())
    coords = (coords[0].cpu() + 0.5) * torch.tensor([ow / w, oh / h]) - 0.5
    return coords, conf[0].cpu()


def _hand_spacing(cfg: dict, coords: torch.Tensor):
    """For a hand model: the data set's convention, ``wrist_mm`` between the predicted wrist landmarks."""
    if cfg["data"] != "hand":
        return None
    options = cfg.get("data_options", {})
    wrist = list(options.get("wrist_indices", (1, 5)))
    subset = options.get("landmark_indices")
    if subset is not None:
        if not all(i in subset for i in wrist):
            return None
        wrist = [list(subset).index(i) for i in wrist]
    dist = float((coords[wrist[0]] - coords[wrist[1]]).norm())
    if not dist > 0:
        return None
    mm = float(options.get("wrist_mm", 50.0)) / dist
    return [mm, mm]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coorkern.predict", description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="BMP/PNG/JPEG/TIFF, DICOM, MHA/MHD, NRRD or NIfTI images")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="pixel spacing of the input images in mm (one value, or x y)")
    p.add_argument("--out", default="predictions", help="folder for the overlay PNGs and predictions.json")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype for inference")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay PNGs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir() and (checkpoint / "checkpoint_best.pt").is_file():
        checkpoint = checkpoint / "checkpoint_best.pt"
    if args.spacing is not None and (len(args.spacing) not in (1, 2) or min(args.spacing) <= 0):
        parser.error("--spacing takes one or two positive numbers (mm per pixel in x [and y])")
    try:
        ckpt = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    cfg = ckpt["config"]
    spacing = args.spacing
    if spacing is not None and len(spacing) == 1:
        spacing = spacing * 2
    known = [KNOWN_SPACING[cfg["data"]]] * 2 if cfg["data"] in KNOWN_SPACING else None
    device = device_or_error(parser, args.device)
    model = model_from_checkpoint(ckpt, device)
    out = Path(args.out)
    results = []
    for name in args.images:
        try:
            image, header_spacing = data_mod.read_image_with_spacing(name)
        except data_mod.DatasetFormatError as exc:
            parser.error(str(exc))
        coords, conf = predict_image(model, image, cfg["image_size"], device, args.amp)
        entry = {
            "image": str(name),
            "image_size": list(image.shape[-2:]),
            "landmarks_px": [[round(float(x), 3), round(float(y), 3)] for x, y in coords.tolist()],
            "confidence": [round(float(c), 4) for c in conf.tolist()],
        }
        candidates = (  # first known wins; a data set's measured convention (hand) before the header
            (spacing, "given"),
            (_hand_spacing(cfg, coords), "wrist width (hand data set) of the predicted landmarks"),
            (header_spacing, "image header"),
            (known, f"the {cfg['data']} data set's convention"),
        )
        image_spacing, source = next(((s, why) for s, why in candidates if s is not None), (None, None))
        if image_spacing is not None:
            entry["spacing_mm"] = [round(v, 6) for v in image_spacing]
            entry["spacing_source"] = source
            entry["landmarks_mm"] = [[round(x * image_spacing[0], 4), round(y * image_spacing[1], 4)]
                                     for x, y in coords.tolist()]
        if not args.no_overlay:
            scale = max(1, 512 // max(image.shape[-2:]))
            path = save_overlay(out / f"{Path(name).stem}_landmarks.png", image, pred=coords, scale=scale)
            entry["overlay"] = str(path)
        results.append(entry)
    write_json(out / "predictions.json", results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
