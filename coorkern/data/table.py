"""The generic format: one CSV or JSON file listing images and their landmarks.

CSV: an optional header names the columns -- the image (``image_path``/``image``/``file``/
``filename``, else the first column), the landmarks in any of the usual spellings
(``x0,y0,...`` 0- or 1-based, ``1_x,1_y,...``, ``x_1,y_1,...``), and optionally
``spacing`` (or ``spacing_x, spacing_y``, mm per pixel) and ``split``.  Without a header
the columns are the path then the coordinates (an odd count of numbers: the last is the
spacing).  JSON: a list (or ``{"samples": [...]}``) of ``{"image": ..., "landmarks": [[x,
y], ...], "spacing": s or [sx, sy], "split": ...}``.

Images: any format :func:`read_image` reads, paths relative to the file's folder (a name
not found there is looked up by file name under that folder, so a CSV naming ``017.jpg``
finds ``cepha400/017.jpg``).  Without a spacing column, the image header's spacing (DICOM,
MetaImage, NRRD, NIfTI) is used; else none (metrics in pixels).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ._common import DatasetFormatError, fail, fraction_split, is_header, landmark_columns, parse_float, read_lines, \
    where
from .dataset import NAN_SPACING, Record
from .images import index_images

__all__ = ["csv_records"]

_IMAGE_COLUMNS = ("image_path", "image", "file", "filename", "path")
_DEFAULT_FILES = ("landmarks.csv", "landmarks.json", "annotations.csv", "annotations.json")


class _ImageFinder:
    """Resolves image paths relative to the annotation file's folder, else by name under it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._by_name: Optional[dict[str, Path]] = None

    def __call__(self, image: str) -> Path:
        path = Path(image)
        if path.is_absolute():
            return path
        if (self.base / path).is_file():
            return self.base / path
        if self._by_name is None:  # indexed only when some path is not where the file says
            self._by_name = {p.name: p for p in index_images(self.base).values()}
        return self._by_name.get(path.name, self.base / path)


def _record(image, coords, spacing, where_: str, find: _ImageFinder) -> Record:
    if not image:
        raise DatasetFormatError(f"{where_}: missing image path")
    if len(coords) < 2 or len(coords) % 2:
        raise DatasetFormatError(
            f"{where_}: expected x0, y0, x1, y1, ... (an even number of coordinates), got {len(coords)}")
    if spacing is None:
        spacing = NAN_SPACING
    elif len(spacing) == 1:
        spacing = (spacing[0], spacing[0])
    arr = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return Record(Path(image).stem, find(image), arr, tuple(float(s) for s in spacing), source=where_)


def _json_rows(table: Path, find: _ImageFinder) -> list:
    try:
        data = json.loads(table.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetFormatError(f"{table}: annotation file not found") from None
    except json.JSONDecodeError as exc:
        raise fail(table, exc.lineno, f"invalid JSON ({exc.msg})") from None
    samples = data.get("samples") if isinstance(data, dict) else data
    if not isinstance(samples, list):
        raise DatasetFormatError(f"{table}: expected a list of samples or {{'samples': [...]}}")
    rows = []
    for k, s in enumerate(samples):
        where_ = f"{table}, sample {k}"
        if not isinstance(s, dict) or "landmarks" not in s:
            raise DatasetFormatError(f"{where_}: expected an object with 'image' and 'landmarks'")
        try:
            coords = [float("nan") if v is None else float(v) for pt in s["landmarks"] for v in pt]
            spacing = s.get("spacing")
            if spacing is not None:
                spacing = [float(v) for v in (spacing if isinstance(spacing, list) else [spacing])]
        except (TypeError, ValueError):
            raise DatasetFormatError(f"{where_}: landmarks must be [[x, y], ...] and spacing numbers") from None
        image = s.get("image") or s.get("image_path")
        rows.append((_record(image, coords, spacing, where_, find), s.get("split")))
    return rows


def _csv_rows(table: Path, find: _ImageFinder) -> list:
    reader = list(csv.reader(read_lines(table)))
    header = [h.strip().lower() for h in reader[0]] if reader and is_header(reader[0]) else None
    if header is not None:
        pairs = landmark_columns(header, table)
        image_col = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), 0)
        spacing_cols = [header.index(c) for c in ("spacing",) if c in header] or \
            [header.index(c) for c in ("spacing_x", "spacing_y") if c in header]
        if len(spacing_cols) == 1 and header[spacing_cols[0]] != "spacing":
            raise fail(table, 1, "spacing_x and spacing_y go together")
        split_col = header.index("split") if "split" in header else None
    rows = []
    for line_no, cells in enumerate(reader, 1):
        if header is not None and line_no == 1 or not any(c.strip() for c in cells):
            continue
        cells = [c.strip() for c in cells]
        where_ = where(table, line_no)
        if header is None:
            numbers = [parse_float(c, table, line_no) for c in cells[1:]]
            spacing = [numbers.pop()] if len(numbers) % 2 else None
            rows.append((_record(cells[0], numbers, spacing, where_, find), None))
            continue
        if len(cells) != len(header):
            raise fail(table, line_no, f"expected {len(header)} columns (the header), got {len(cells)}")
        coords = [parse_float(cells[c], table, line_no) for pair in pairs for c in pair]
        spacing = [parse_float(cells[c], table, line_no) for c in spacing_cols] or None
        split = cells[split_col] if split_col is not None else None
        rows.append((_record(cells[image_col], coords, spacing, where_, find), split))
    return rows


def csv_records(root, split="train", train_fraction=0.8, file=None):
    """Records of a generic CSV/JSON annotation file (the module docstring describes the format).

    ``root`` is the file or its folder (then ``landmarks.csv/.json`` or ``annotations.*``;
    ``file=`` names another).  With a split column, ``split`` selects its rows (``all``:
    every row); without one, the first ``train_fraction`` are ``train``, the rest ``test``.
    """
    root = Path(root)
    if file is None:
        if root.is_file():
            file = root
        else:
            file = next((root / n for n in _DEFAULT_FILES if (root / n).is_file()), None)
            if file is None:
                raise DatasetFormatError(f"{root}: no landmarks.csv/landmarks.json (or annotations.*) found; "
                                         "pass file=")
    table = Path(file)
    find = _ImageFinder(table.parent)
    rows = _json_rows(table, find) if table.suffix.lower() == ".json" else _csv_rows(table, find)
    if any(s is not None for _, s in rows):
        return [r for r, s in rows if split == "all" or s == split]
    return fraction_split([r for r, _ in rows], split, train_fraction, "csv")
