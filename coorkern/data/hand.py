"""Digital Hand Atlas as distributed with Payer et al.'s code: 37 landmarks, ``all.csv``, ``.mha`` or ``.jpg``.

Layout (under ``root``, at any depth): the images ``<id>.mha`` (Payer) or ``<id>.jpg``
(the atlas), the annotations ``all.csv`` (no header, rows ``id,x1,y1,...,x37,y37`` in
pixels) and optionally the published cross-validation lists ``cv/set<k>/<split>.txt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ._common import DatasetFormatError, fail, fraction_split, parse_float, read_lines, report_missing_images, where
from .dataset import Record
from .images import index_images

__all__ = ["HAND_THRESHOLDS", "hand_records"]

HAND_THRESHOLDS = (2.0, 4.0, 10.0)  # SDR radii, mm


def _find_table(root: Path, csv_name: str) -> Path:
    table = root / csv_name
    if not table.is_file():
        table = next(iter(sorted(root.rglob(csv_name))), table)
    return table


def _parse_rows(table: Path, wrist_indices, wrist_mm: float, landmark_indices) -> dict[str, Record]:
    records: dict[str, Record] = {}
    for line_no, line in enumerate(read_lines(table), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or len(parts) % 2 == 0:
            raise fail(table, line_no,
                       f"expected 'image_id,x0,y0,...' with an even number of coordinates, got {len(parts) - 1}")
        coords = np.asarray([parse_float(p, table, line_no) for p in parts[1:]], dtype=np.float64).reshape(-1, 2)
        for idx in wrist_indices:
            if idx >= coords.shape[0]:
                raise fail(table, line_no, f"wrist landmark index {idx} out of range for {coords.shape[0]} landmarks")
        # The physical scale is the published convention, wrist_mm between the two wrist
        # landmarks (before selecting a subset).  It wins over any spacing in the image
        # header (Payer's .mha files carry an ElementSpacing that the evaluations ignore):
        # a set Record.spacing is never replaced by the header's.
        dist = float(np.linalg.norm(coords[wrist_indices[0]] - coords[wrist_indices[1]]))
        if not dist > 0:
            raise fail(table, line_no, f"wrist landmarks {tuple(wrist_indices)} coincide or are missing")
        if landmark_indices is not None:
            coords = coords[list(landmark_indices)]
        image_id = parts[0]
        if image_id in records:
            raise fail(table, line_no, f"image id {image_id!r} appears twice")
        records[image_id] = Record(image_id, Path(), coords, (wrist_mm / dist, wrist_mm / dist),
                                   source=where(table, line_no))
    return records


def _find_fold(root: Path, table: Path, fold: int) -> Path:
    name = f"set{fold}"
    candidates = [table.parent / "cv" / name] + sorted(p for p in root.rglob(name) if p.parent.name == "cv")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DatasetFormatError(f"{root}: cross-validation folder cv/{name} not found (next to {table.name} or under "
                             "the root)")


def _fold_ids(root: Path, table: Path, fold: int, split: str) -> tuple[list[str], Path]:
    folder = _find_fold(root, table, fold)
    listing = folder / f"{split}.txt"
    if not listing.is_file():
        available = sorted(p.stem for p in folder.glob("*.txt"))
        raise ValueError(f"hand split with cv_fold={fold} must be one of {available} (files in {folder}), "
                         f"got {split!r}")
    return [line.strip() for line in read_lines(listing) if line.strip()], listing


def hand_records(root, split="train", train_fraction=609 / 909, wrist_indices=(1, 5), wrist_mm=50.0,
                 landmark_indices=None, csv_name="all.csv", cv_fold: Optional[int] = None, strict: bool = False):
    """Records of the hand atlas.

    Splits: with ``cv_fold=k``, the published list ``cv/set<k>/<split>.txt`` (``train``,
    ``test``, ...); otherwise the first ``train_fraction`` of ``all.csv``'s rows are
    ``train``, the rest ``test`` (``all``: every row).  Rows whose image is absent are
    skipped with one warning naming them (a full download has one such row); with
    ``strict=True`` they are an error.  The spacing is ``wrist_mm`` over the distance of
    the landmarks ``wrist_indices`` (indices into the csv's landmarks, before
    ``landmark_indices``), whatever the image header says.
    """
    root = Path(root)
    table = _find_table(root, csv_name)
    rows = _parse_rows(table, wrist_indices, wrist_mm, landmark_indices)
    if cv_fold is not None:
        ids, listing = _fold_ids(root, table, int(cv_fold), split)
        unknown = [i for i in ids if i not in rows]
        if unknown:
            raise DatasetFormatError(f"{listing}: {len(unknown)} id(s) not in {table} (first: {unknown[0]!r})")
        selected = [rows[i] for i in ids]
    else:
        selected = fraction_split(list(rows.values()), split, train_fraction, "hand")
    images = index_images(root)
    report_missing_images("hand", [r.id for r in selected if r.id not in images], str(root), strict)
    for r in selected:
        r.image_path = images.get(r.id, Path())
    return [r for r in selected if r.id in images]
