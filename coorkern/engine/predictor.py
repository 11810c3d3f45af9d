"""Landmarks for image files of any size: what ``coorkern predict`` runs.

:func:`predict_batch` resizes images to the model's input and maps the heatmap peaks back
to each image's own pixels; :class:`Predictor` turns a checkpoint's predictions into
per-image entries (pixels, millimetres where a spacing is known, confidence, conformal
radius) and overlay PNGs; :func:`predict_files` reads and predicts files in batches,
skipping unreadable ones; :func:`expand_inputs` turns files, folders and glob patterns
into the files to read.  A spine model's entries also carry the three Cobb angles of the
predicted corners (``cobb_angles``, in the image's own pixels), and its overlays draw the
vertebrae and the main angle.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import conformal, metrics
from .. import data as data_mod
from .checkpoints import model_from_checkpoint
from .cobb import ANGLE_NAMES, angle_fields, main_curve
from .files import atomic_write_bytes, write_json
from .inference import autocast
from .overlays import save_overlay

__all__ = ["predict_image", "predict_batch", "expand_inputs", "Predictor", "predict_files", "to_csv",
           "write_predictions", "KNOWN_SPACING", "CSV_FIELDS", "COBB_CSV_FIELDS"]

KNOWN_SPACING = {"isbi2015": 0.1}  # mm per original pixel, when the model was trained on that data set
IMAGE_SUFFIXES = data_mod.IMAGE_EXTENSIONS  # the files a folder or pattern contributes
CSV_FIELDS = ("image", "landmark", "x", "y", "x_mm", "y_mm", "confidence", "radius_px", "radius_mm", "coverage")
# Spine models: the image's Cobb angles (degrees), repeated on each of its rows so the file stays one table.
COBB_CSV_FIELDS = tuple(f"cobb_{name}" for name in ANGLE_NAMES)


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(suffix) for suffix in IMAGE_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their image files, sorted) and glob patterns -> ``(paths, problems)``.

    A problem is ``(input, reason)`` for an input that names nothing to read.
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image_file(p))
            if not found:
                problems.append((name, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"))
        elif glob.has_magic(name):
            found = sorted(Path(p) for p in glob.glob(name, recursive=True) if _is_image_file(Path(p)))
            if not found:
                problems.append((name, "no image file matches this pattern"))
        elif path.exists():
            found = [path]
        else:
            found = []
            problems.append((name, "file not found"))
        paths.extend(found)
    unique = list(dict.fromkeys(paths))
    return unique, problems


def predict_batch(model, images: Sequence[torch.Tensor], image_size, device="cpu", amp=None):
    """Landmarks of ``(1, H, W)`` images of any sizes in their own pixels: ``(coords (N, L, 2), confidence (N, L))``.

    Each image is resized to ``image_size`` (bilinear, antialiased) and normalized; a
    heatmap pixel centre ``c`` maps back to ``(c + 0.5) * original / resized - 0.5``.
    """
    h, w = image_size
    batch = torch.cat([F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                                     antialias=True) for image in images])
    batch = data_mod.normalize(batch).to(device)
    with torch.no_grad(), autocast(device, amp):
        logits = model(batch)
    coords, conf = metrics.decode_heatmaps(logits.float())
    scale = torch.tensor([[image.shape[-1] / w, image.shape[-2] / h] for image in images])  # (N, 2) x, y
    coords = (coords.cpu() + 0.5) * scale[:, None, :] - 0.5
    return coords, conf.cpu()


def predict_image(model, image: torch.Tensor, image_size, device="cpu", amp=None):
    """Landmarks of one ``(1, H, W)`` image in its own pixels: ``(coords (L, 2), confidence (L,))``."""
    coords, conf = predict_batch(model, [image], image_size, device, amp)
    return coords[0], conf[0]


def hand_spacing(cfg: dict, coords: torch.Tensor):
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


def _round(value: float, digits: int):
    return round(value, digits) if math.isfinite(value) else None


class Predictor:
    """A checkpoint's model with what turns its output into records: spacing rules and conformal radii.

    ``spacing``: mm per input pixel (one value, or x and y) overriding every other source;
    ``overlay_dir``: where to write an overlay PNG per image (None: none).
    """

    def __init__(self, ckpt: dict, device="cpu", *, amp: Optional[str] = None,
                 spacing: Optional[Sequence[float]] = None, overlay_dir=None) -> None:
        self.cfg = ckpt["config"]
        self.model = model_from_checkpoint(ckpt, device)
        self.image_size = tuple(self.cfg["image_size"])
        self.calibration = ckpt.get("conformal")
        self.device, self.amp = device, amp
        self.overlay_dir = None if overlay_dir is None else Path(overlay_dir)
        self.given = None if spacing is None else (list(spacing) * 2)[:2]
        self.spine = self.cfg["data"] == "spine"

    def _spacing(self, file_spacing, coords):
        """First known wins: the given spacing, a data set's measured convention (hand), the file's header,
        the spacing every training image shared, ISBI's 0.1 mm (checkpoints that store no spacing)."""
        candidates = (
            (self.given, "given"),
            (hand_spacing(self.cfg, coords), "wrist width (hand data set) of the predicted landmarks"),
            (None if file_spacing is None else [float(v) for v in file_spacing], "image header"),
            (self.cfg.get("pixel_spacing_mm"), "the training images' spacing"),
            ([KNOWN_SPACING[self.cfg["data"]]] * 2 if self.cfg["data"] in KNOWN_SPACING else None,
             f"the {self.cfg['data']} data set's convention"),
        )
        return next(((s, why) for s, why in candidates if s is not None), (None, None))

    def entries(self, names, images, spacings) -> list:
        """One entry per image (``names``, ``(1, H, W)`` ``images``, header ``spacings`` or None)."""
        coords, conf = predict_batch(self.model, images, self.image_size, self.device, self.amp)
        radius = conformal.radii(self.calibration, conf) if self.calibration else None
        return [self._entry(name, image, file_spacing, coords[i], conf[i], None if radius is None else radius[i])
                for i, (name, image, file_spacing) in enumerate(zip(names, images, spacings))]

    def _entry(self, name, image, file_spacing, coords, conf, radius) -> dict:
        oh, ow = image.shape[-2:]
        h, w = self.image_size
        entry = {"image": str(name), "image_size": [oh, ow],
                 "landmarks_px": [[round(float(x), 3), round(float(y), 3)] for x, y in coords.tolist()],
                 "confidence": [round(float(c), 4) for c in conf.tolist()]}
        spacing, source = self._spacing(file_spacing, coords)
        if spacing is not None:
            entry["spacing_mm"] = [round(v, 6) for v in spacing]
            entry["spacing_source"] = source
            entry["landmarks_mm"] = [[round(x * spacing[0], 4), round(y * spacing[1], 4)] for x, y in coords.tolist()]
        if radius is not None:
            # A circle of radius r in the model's pixels is an ellipse here; the circle around it keeps the coverage.
            entry["coverage"] = self.calibration["coverage"]
            entry["radius_px"] = [_round(float(r) * max(ow / w, oh / h), 3) for r in radius]
            if spacing is not None:
                entry["radius_mm"] = [_round(float(r) * max(ow / w * spacing[0], oh / h * spacing[1]), 4)
                                      for r in radius]
        entry["landmarks"] = _records(entry)
        curve = None
        if self.spine:  # in the image's own pixels and height, as the challenge measures them
            entry["cobb_angles"] = angle_fields(metrics.cobb_angles(coords.double(), oh))
            pair, main = main_curve(coords), entry["cobb_angles"]["main"]
            curve = None if pair is None or main is None else (pair[0], pair[1], main)
        if self.overlay_dir is not None:
            scale = max(1, 512 // max(oh, ow))
            radius_px = None if radius is None else torch.tensor(
                [math.inf if r is None else r for r in entry["radius_px"]])
            path = save_overlay(self.overlay_dir / f"{Path(name).stem}_landmarks.png", image, pred=coords,
                                scale=scale, radii=radius_px, vertebrae=self.spine, cobb=curve)
            entry["overlay"] = str(path)
        return entry


def _records(entry: dict) -> list:
    """One record per landmark of an image entry (the CSV rows, less the image name)."""
    records = []
    for i, (x, y) in enumerate(entry["landmarks_px"]):
        record = {"landmark": i, "x": x, "y": y}
        if "landmarks_mm" in entry:
            record["x_mm"], record["y_mm"] = entry["landmarks_mm"][i]
        record["confidence"] = entry["confidence"][i]
        if "radius_px" in entry:
            record["radius_px"] = entry["radius_px"][i]
            if "radius_mm" in entry:
                record["radius_mm"] = entry["radius_mm"][i]
            record["coverage"] = entry["coverage"]
        records.append(record)
    return records


def to_csv(results: list) -> str:
    """One row per image and landmark (:data:`CSV_FIELDS`); with spine entries, the image's Cobb angles in
    the columns :data:`COBB_CSV_FIELDS` of each of its rows."""
    spine = any("cobb_angles" in entry for entry in results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS + (COBB_CSV_FIELDS if spine else ()), restval="",
                            lineterminator="\n")
    writer.writeheader()
    for entry in results:
        angles = {f"cobb_{k}": v for k, v in entry.get("cobb_angles", {}).items()}
        for record in entry["landmarks"]:
            writer.writerow({"image": entry["image"], **record, **angles})
    return buffer.getvalue()


def write_predictions(results: list, out, form: str = "json") -> str:
    """``out/predictions.json`` or ``.csv`` (``form``); returns the text written."""
    out = Path(out)
    if form == "csv":
        text = to_csv(results)
        atomic_write_bytes(out / "predictions.csv", text.encode())
    else:
        text = json.dumps(results, indent=2) + "\n"
        write_json(out / "predictions.json", results)
    return text


def _read_all(names: Sequence[Path], failures: list, bar) -> tuple[list, list, list]:
    ok_names, images, spacings = [], [], []
    for name in names:
        try:
            image, spacing = data_mod.read_image_with_spacing(name)
        except (data_mod.DatasetFormatError, OSError, RuntimeError, ValueError) as exc:
            failures.append((str(name), str(exc)))
            tqdm.write(f"skipped {name}: {exc}", file=sys.stderr)
            bar.update(1)
            continue
        ok_names.append(name)
        images.append(image)
        spacings.append(spacing)
    return ok_names, images, spacings


def predict_files(predictor: Predictor, paths: Sequence[Path], batch_size: int = 8, progress: bool = True,
                  failures: Optional[list] = None) -> list:
    """Entries of the readable ``paths``, ``batch_size`` at a time; the unreadable ones are reported on
    stderr and appended to ``failures`` as ``(name, reason)``.  ``progress``: a bar on a terminal."""
    failures = [] if failures is None else failures
    results: list = []
    with tqdm(total=len(paths), desc="predict", unit="image", dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for start in range(0, len(paths), batch_size):
            names, images, spacings = _read_all(paths[start:start + batch_size], failures, bar)
            if names:
                results.extend(predictor.entries(names, images, spacings))
                bar.update(len(names))
    return results
