"""ISBI 2015 cephalometric challenge: 400 images, 19 landmarks, two doctors, 0.1 mm per pixel.

The copies people have, all detected under ``root`` (at any depth):

* the original challenge layout: ``RawImage/**/NNN.bmp`` and
  ``AnnotationsByMD/400_senior|400_junior/NNN.txt`` (19 ``x,y`` lines in pixels, then
  extra lines that are ignored);
* the "cepha400" mirror: ``cepha400/NNN.jpg`` (or ``NNN.jpg``) with ``train_senior.csv``,
  ``test1_senior.csv``, ``test2_senior.csv`` -- header ``image_path,1_x,1_y,...``, one row
  per image in any order, pixels, the senior doctor only;
* Payer et al.'s ``all_senior.csv``, ``all_junior.csv``, ``all_challenge.csv`` -- no
  header, rows ``id,x1,y1,...`` in millimetres (pixel = mm / 0.1), all 400 images.

Any ``*senior.csv`` / ``*junior.csv`` / ``*challenge.csv`` with a header is read as pixels,
without one as Payer's millimetres; ``annotations=PATH`` (a file or folder) replaces the
search under ``root``.  Where several sources annotate an image, the original text files
win, then the pixel CSVs, then Payer's.

The original layout ships one annotation file per image, so an annotation file without
its image is an error; the CSVs annotate all 400 images whatever the copy holds, so their
images that are absent are skipped with one warning (``strict=True``: an error), and a
split none of whose images is present is an error.
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ._common import DatasetFormatError, fail, is_header, landmark_columns, parse_float, parse_points, read_lines, \
    report_missing_images, where
from .dataset import Record
from .images import index_images

__all__ = ["ISBI_ANNOTATORS", "ISBI_SPACING_MM", "ISBI_SPLITS", "ISBI_THRESHOLDS", "isbi2015_records"]

ISBI_SPACING_MM = 0.1
ISBI_THRESHOLDS = (2.0, 2.5, 3.0, 4.0)  # SDR radii, mm
ISBI_NUM_LANDMARKS = 19
_TRAIN, _TEST1, _TEST2 = range(1, 151), range(151, 301), range(301, 401)
ISBI_NUM_IMAGES = 400
ISBI_SPLITS = {
    "paper": {"train": _TRAIN, "test": range(151, 401), "test1": _TEST1, "test2": _TEST2},
    "challenge": {"train": _TRAIN, "test1": _TEST1, "test2": _TEST2},
}
# ``mean`` is the paper protocol's ground truth (the two doctors averaged); ``challenge`` is
# Payer's all_challenge.csv (the senior doctor's, except landmark 16 on Test2).
ISBI_ANNOTATORS = ("mean", "senior", "junior", "challenge")
_DOCTORS = ("senior", "junior", "challenge")
_CSV_NAME = re.compile(r"^(?:.*[_-])?(senior|junior|challenge)\.csv$", re.IGNORECASE)
_LOOKED_FOR = ("AnnotationsByMD/400_senior|400_junior/NNN.txt (original layout), *_senior.csv / *_junior.csv "
               "with the header image_path,1_x,1_y,... (cepha400 mirror), all_senior.csv / all_junior.csv / "
               "all_challenge.csv without a header, in mm (Payer et al.)")
_noted_roots: set = set()  # roots whose 'senior only' note was printed


@dataclass
class _Source:
    """One doctor's annotations in one place: ``lookup(number)`` gives ``(pixels (L, 2), where)`` or None."""

    lookup: Callable[[int], Optional[tuple]]
    describe: Callable[[int], str]  # where ``number`` was looked for, for error messages
    # True when the annotation makes the image part of the copy (the original layout's one file per image).
    claims: Callable[[int], bool] = lambda number: False


def _image_number(text: str) -> Optional[int]:
    stem = Path(text.strip()).stem
    return int(stem) if stem.isdigit() else None


def _text_folder(folder: Path, num_landmarks: int) -> _Source:
    def lookup(number: int):
        path = folder / f"{number:03d}.txt"
        if not path.is_file():
            return None
        return parse_points(read_lines(path), path, num_landmarks), str(path)

    return _Source(lookup, lambda number: f"{folder / f'{number:03d}.txt'}: annotation file not found",
                   lambda number: (folder / f"{number:03d}.txt").is_file())


def _table_source(path: Path, num_landmarks: int) -> tuple[_Source, bool]:
    """A CSV of one doctor: with a header in pixels (the mirror), without one in mm (Payer)."""
    rows = list(csv.reader(read_lines(path)))
    header = rows[0] if rows and is_header(rows[0]) else None
    if header is not None:
        columns = [c for pair in landmark_columns(header, path) for c in pair]
        to_pixels = 1.0
    else:
        columns = list(range(1, 1 + 2 * num_landmarks))
        # Payer's values have one decimal (0.1 mm = 1 pixel); rounding to 1e-6 px removes the
        # float noise of the division so that they equal the pixel files exactly.
        to_pixels = 1.0 / ISBI_SPACING_MM
    if len(columns) != 2 * num_landmarks:
        raise fail(path, 1, f"expected {num_landmarks} landmarks, the header has {len(columns) // 2}")
    table: dict[int, tuple] = {}
    for line_no, cells in enumerate(rows, 1):
        if header is not None and line_no == 1 or not any(c.strip() for c in cells):
            continue
        number = _image_number(cells[0])
        if number is None:
            raise fail(path, line_no, f"expected an image number or name like 001 or 001.jpg, got {cells[0]!r}")
        if len(cells) != (len(header) if header is not None else 1 + 2 * num_landmarks):
            raise fail(path, line_no, f"expected {1 + 2 * num_landmarks} columns (id and {num_landmarks} x,y "
                                      f"pairs), got {len(cells)}")
        values = np.asarray([parse_float(cells[c], path, line_no) for c in columns], dtype=np.float64)
        if header is None and np.nanmax(np.abs(values)) > 300:  # 2400 px = 240 mm
            raise fail(path, line_no, "a headerless ISBI 2015 CSV is Payer's format in millimetres, but this row "
                                      "has values above 300; give pixel CSVs a header (image_path,1_x,1_y,...)")
        table[number] = (np.round(values * to_pixels, 6).reshape(-1, 2), where(path, line_no))
    return _Source(table.get, lambda number: f"{path}: no row for image {number:03d}"), header is not None


def _find_sources(where_: Path, num_landmarks: int) -> dict[str, list[_Source]]:
    """Annotation sources per doctor, in priority order (text files, pixel CSVs, Payer's mm CSVs)."""
    files = [where_] if where_.is_file() else sorted(where_.rglob("*.csv"))
    folders = [] if where_.is_file() else sorted(where_.rglob("400_*"))
    sources: dict[str, list] = {}
    for folder in folders:
        doctor = folder.name[4:]
        if folder.is_dir() and doctor in _DOCTORS:
            sources.setdefault(doctor, []).append(_text_folder(folder, num_landmarks))
    tables = []
    for path in files:
        match = _CSV_NAME.match(path.name)
        if match is None:
            if where_.is_file():
                raise DatasetFormatError(f"{path}: the annotation file's name must end in senior.csv, junior.csv "
                                         "or challenge.csv (it names the doctor)")
            continue
        source, in_pixels = _table_source(path, num_landmarks)
        tables.append((not in_pixels, match.group(1).lower(), source))
    for _, doctor, source in sorted(tables, key=lambda t: t[0]):
        sources.setdefault(doctor, []).append(source)
    return sources


def _choose_annotator(annotator: Optional[str], sources: dict, root: Path) -> str:
    if annotator is not None:
        return annotator
    if "senior" in sources and "junior" in sources:
        return "mean"
    if "senior" in sources and root not in _noted_roots:
        _noted_roots.add(root)
        print(f"note: isbi2015: only the senior doctor's annotations found under {root}; using annotator='senior' "
              "(the paper's ground truth is the mean of both doctors: add Payer's all_junior.csv for it)",
              file=sys.stderr)
    return "senior"


def _image_numbers(ids) -> list:
    """``ids`` as image numbers: ints, or names as the records and files have them ("001", "001.jpg")."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"ids must be a sequence of image numbers, e.g. [1, 2] or ['001', '002'], got {ids!r}")
    numbers = []
    for i in ids:
        if isinstance(i, str) and _image_number(i) is not None:
            number = _image_number(i)
        elif isinstance(i, (int, np.integer)) and not isinstance(i, bool):
            number = int(i)
        else:
            raise TypeError(f"ids: expected image numbers as ints or digit strings like '001', got {i!r}")
        if not 1 <= number <= ISBI_NUM_IMAGES:
            raise ValueError(f"ids: ISBI 2015 image numbers run from 1 to {ISBI_NUM_IMAGES}, got {i!r}")
        numbers.append(number)
    return numbers


def isbi2015_records(root, split="train", protocol="paper", annotator=None, num_landmarks=ISBI_NUM_LANDMARKS,
                     ids=None, annotations=None, strict=False):
    """Records of the ISBI 2015 data (the module docstring lists the layouts).

    Splits: ``train`` (images 1-150), ``test`` (151-400, the paper protocol), ``test1``
    (151-300), ``test2`` (301-400); ``protocol="challenge"`` allows train/test1/test2.
    ``annotator``: ``mean`` of the two doctors, ``senior``, ``junior`` or ``challenge``;
    default ``mean`` when both doctors are available, else ``senior`` (with a note).
    Spacing: 0.1 mm per original pixel.
    """
    root = Path(root)
    if protocol not in ISBI_SPLITS:
        raise ValueError(f"protocol must be one of {tuple(ISBI_SPLITS)}, got {protocol!r}")
    if split not in ISBI_SPLITS[protocol]:
        raise ValueError(f"isbi2015 split for protocol {protocol!r} must be one of {tuple(ISBI_SPLITS[protocol])}, "
                         f"got {split!r}")
    if annotator is not None and annotator not in ISBI_ANNOTATORS:
        raise ValueError(f"annotator must be one of {ISBI_ANNOTATORS}, got {annotator!r}")
    search = Path(annotations) if annotations is not None else root
    if not search.exists():
        raise DatasetFormatError(f"{search}: annotations not found")
    sources = _find_sources(search, num_landmarks)
    if not sources:
        raise DatasetFormatError(f"{search}: no ISBI 2015 annotations found; looked for {_LOOKED_FOR}")
    annotator = _choose_annotator(annotator, sources, root)
    doctors = ("senior", "junior") if annotator == "mean" else (annotator,)
    for doctor in doctors:
        if doctor not in sources:
            raise DatasetFormatError(f"{search}: annotator={annotator!r} needs the {doctor} annotations, found only "
                                     f"{sorted(sources)}; looked for {_LOOKED_FOR}")
    images = {n: p for stem, p in index_images(root).items() if (n := _image_number(stem)) is not None}
    wanted = _image_numbers(ids) if ids is not None else list(ISBI_SPLITS[protocol][split])
    records, absent = [], []
    for number in wanted:
        found = [next((hit for s in sources[d] if (hit := s.lookup(number)) is not None), None) for d in doctors]
        in_copy = ids is not None or number in images or any(s.claims(number) for d in doctors for s in sources[d])
        if not in_copy:
            if any(hit is not None for hit in found):
                absent.append(f"{number:03d}")
            continue
        for doctor, hit in zip(doctors, found):
            if hit is None:
                looked = "; ".join(s.describe(number) for s in sources[doctor])
                raise DatasetFormatError(f"no {doctor} annotation of image {number:03d}: {looked}")
        path = images.get(number, root / "RawImage" / f"{number:03d}.bmp")
        points = np.mean([hit[0] for hit in found], axis=0)
        source = "; ".join(hit[1] for hit in found)
        records.append(Record(f"{number:03d}", path, points, (ISBI_SPACING_MM, ISBI_SPACING_MM), source=source))
    if not records and absent:
        raise DatasetFormatError(f"{root}: none of the {len(absent)} annotated images of isbi2015 split {split!r} "
                                 f"(ids {absent[0]}-{absent[-1]}) found under it")
    report_missing_images("isbi2015", absent, str(root), strict)
    return records
