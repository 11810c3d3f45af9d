"""AASCE 2019 / BoostNet spinal radiographs: 68 landmarks (17 vertebrae x 4 corners), Cobb angles, no spacing.

The public data of the MICCAI 2019 AASCE challenge in its distributed layout (under ``root``,
or one folder below it)::

    data/training/<image name>            481 anterior-posterior X-rays (8-bit JPEG)
    data/test/<image name>                the 128 test images, where the copy has them
    labels/training/filenames.csv         one image name per line, no header
    labels/training/<image name>.mat      MATLAB v5, array ``p2``: 68 x 2 pixels (x, y)
    labels/training/landmarks.csv         optional: no header, 136 numbers per row,
                                          x1..x68 then y1..y68 as fractions of width/height
    labels/training/angles.csv            optional: no header, 3 Cobb angles (degrees) per row
    labels/test/...                       the same for the test images

Row *i* of ``landmarks.csv`` and ``angles.csv`` belongs to row *i* of ``filenames.csv``.
Image names contain spaces and mixed case (``sunhl-1th-02-Jan-2017-162 A AP.jpg``,
``... a ap.jpg``) and are used verbatim; a record's ``id`` is the name without its extension.

* **Landmarks**: the ``.mat`` files (pixels of the original image) are the source and are
  required for every image; ``filenames.csv`` with them suffices.  Where ``landmarks.csv``
  exists as well, each of its rows times the image's (width, height) must agree with the
  ``.mat`` file within :data:`SPINE_CSV_TOLERANCE_PX` (1 px; the distributed copies agree
  to 0.04 px) or :class:`DatasetFormatError` names the file and row.  Landmark order: T1 to
  L5, per vertebra top-left, top-right, bottom-left, bottom-right.
* **Spacing**: none is known and none is invented (``Record.spacing`` is NaN): errors and
  the SDR radii :data:`SPINE_THRESHOLDS` are in pixels of the original image.  The radii
  10/20/30/40 px come from the training annotations: a vertebral body is 46-134 px tall
  (5th-95th percentile, median 90 px) and 154 px wide, the gap between one vertebra's
  bottom corners and the next one's top corners is ~35 px (images are 355-1427 x
  973-3755 px, W x H, median 854 x 2360).  10 px is about a ninth of a vertebra; 40 px is
  the disc gap, beyond which a corner is likely on the wrong end plate.
* **Angles**: each record is a :class:`SpineRecord`, a :class:`Record` that also keeps the
  three ground-truth Cobb angles of ``angles.csv`` (``angles``, degrees, in the file's
  order: main curve first; NaN without ``angles.csv``) and the original image size
  (``original_size`` = (H, W); the challenge's rule, :func:`coorkern.metrics.cobb_angles`,
  needs the height).  :func:`spine_angles` gives them by record id.
* **Splits** (``split=``): ``train`` = every row of ``labels/training``; ``test`` =
  ``labels/test`` with ``data/test`` (an error naming the folder when absent: the public
  training copy has no test folder); and a fixed development holdout of the 481 training
  rows, so that model selection uses ``holdout_val`` and reporting ``holdout_test``:

  ================  =====  ==========================================================
  part              rows   0-based rows of ``labels/training/filenames.csv``
  ================  =====  ==========================================================
  ``holdout_train``  361   0-268, 270-339, 341-359, 399-401
  ``holdout_val``     40   269, 360-398
  ``holdout_test``    80   340, 402-480
  ================  =====  ==========================================================

  (:data:`SPINE_HOLDOUT_ROWS`; :func:`spine_holdout_split` lists the file names per part.)
  The rows are those of the distributed ``filenames.csv``, sorted by name.  The parts are
  contiguous ranges cut where the case number (the number before the image letter, e.g.
  ``162`` in ``...-162 B AP.jpg``) changes, and the three rows whose case also appears in
  another range were moved to it (row 269, case 15, to val; row 340, case 156, to test;
  rows 399-401, case 52, to train), so that no case has images in two parts.  A copy
  whose ``filenames.csv`` does not have 481 rows has no holdout (an error).
* **Errors**: a missing, unreadable or truncated ``.mat`` file, a ``p2`` that is not 68 x 2,
  a CSV row with the wrong number of values or a row count that differs from
  ``filenames.csv`` raise :class:`DatasetFormatError` naming the file and row.  A row
  whose image is absent is skipped with one warning naming it (``strict=True``: an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ._common import DatasetFormatError, fail, parse_float, read_lines, report_missing_images
from .dataset import Record
from .images import image_size_of, index_images, suffix_of

__all__ = ["SPINE_HOLDOUT_ROWS", "SPINE_NUM_LANDMARKS", "SPINE_SPLITS", "SPINE_THRESHOLDS", "SpineRecord",
           "spine_angles", "spine_holdout_split", "spine_records"]

SPINE_NUM_LANDMARKS = 68
SPINE_NUM_ANGLES = 3
SPINE_THRESHOLDS = (10.0, 20.0, 30.0, 40.0)  # SDR radii in pixels of the original image (no spacing)
SPINE_CSV_TOLERANCE_PX = 1.0
SPINE_HOLDOUT_NUM_ROWS = 481
# Half-open ranges of 0-based rows of labels/training/filenames.csv (see the module docstring).
SPINE_HOLDOUT_ROWS = {
    "holdout_train": ((0, 269), (270, 340), (341, 360), (399, 402)),
    "holdout_val": ((269, 270), (360, 399)),
    "holdout_test": ((340, 341), (402, 481)),
}
SPINE_SPLITS = ("train", "test") + tuple(SPINE_HOLDOUT_ROWS)
_FOLDERS = {"train": "training", "test": "test"}


@dataclass
class SpineRecord(Record):
    """A :class:`Record` with the image's ground-truth Cobb angles and original size."""

    angles: np.ndarray = field(default_factory=lambda: np.full(SPINE_NUM_ANGLES, np.nan))  # degrees, (3,)
    original_size: tuple[int, int] = (0, 0)  # (H, W) of the image file

    @property
    def image_height(self) -> int:
        return self.original_size[0]


# ---------------------------------------------------------------------------
# Layout


def _find_labels_root(root: Path) -> Path:
    """The folder holding ``data/`` and ``labels/``: ``root`` itself or one below it."""
    if (root / "labels").is_dir():
        return root
    candidates = sorted(p.parent for p in root.glob("*/labels") if p.is_dir())
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise DatasetFormatError(f"{root}: several spine copies below it ({', '.join(map(str, candidates))}); "
                                 "pass one of them as root")
    raise DatasetFormatError(f"{root}: spine labels folder not found (expected labels/training/filenames.csv "
                             "and data/training/*.jpg)")


def _folders(root: Path, split: str) -> tuple[Path, Path]:
    folder = _FOLDERS["test" if split == "test" else "train"]
    base = _find_labels_root(root)
    labels, images = base / "labels" / folder, base / "data" / folder
    for path in (labels, images):
        if not path.is_dir():
            raise DatasetFormatError(f"{path}: spine {split!r} split needs this folder, which is absent")
    return labels, images


def _check_split(split: str) -> None:
    if split not in SPINE_SPLITS:
        raise ValueError(f"spine split must be one of {SPINE_SPLITS}, got {split!r}")


# ---------------------------------------------------------------------------
# Annotation files


def _read_names(path: Path) -> list[str]:
    lines = read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    names, seen = [], {}
    for line_no, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise fail(path, line_no, "empty line (every row names one image)")
        if name in seen:
            raise fail(path, line_no, f"image {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line_no
        names.append(name)
    if not names:
        raise DatasetFormatError(f"{path}: no image names")
    return names


def _read_table(path: Path, names: list[str], width: int, what: str) -> np.ndarray:
    """``(len(names), width)`` numbers, one headerless CSV row per name."""
    lines = read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != len(names):
        line = min(len(lines), len(names)) + 1
        raise fail(path, line, f"has {len(lines)} rows but filenames.csv names {len(names)} images "
                               f"(row {line} {'is missing' if len(lines) < len(names) else 'has no image'})")
    table = np.empty((len(names), width), dtype=np.float64)
    for row, line in enumerate(lines):
        cells = line.split(",")
        if len(cells) != width:
            raise fail(path, row + 1, f"expected {width} numbers ({what}) for {names[row]!r}, got {len(cells)}")
        table[row] = [parse_float(c, path, row + 1) for c in cells]
        if not np.isfinite(table[row]).all():
            raise fail(path, row + 1, f"missing or non-finite value for {names[row]!r}: {line!r}")
    return table


def _read_mat(path: Path, row: int, names_file: Path) -> np.ndarray:
    context = f"{path} (row {row + 1} of {names_file})"
    if not path.is_file():
        raise DatasetFormatError(f"{context}: landmark file not found")
    import scipy.io

    try:
        content = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, MatReadError, ... on bad files
        raise DatasetFormatError(f"{context}: cannot read the MATLAB file ({type(exc).__name__}: {exc})") from exc
    if "p2" not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DatasetFormatError(f"{context}: no array 'p2' (found {found})")
    p2 = content["p2"]
    if not isinstance(p2, np.ndarray) or p2.shape != (SPINE_NUM_LANDMARKS, 2) or p2.dtype.kind not in "iuf":
        raise DatasetFormatError(f"{context}: 'p2' must be a {SPINE_NUM_LANDMARKS} x 2 numeric array (x, y), got "
                                 f"shape {getattr(p2, 'shape', None)} of {getattr(p2, 'dtype', type(p2).__name__)}")
    p2 = p2.astype(np.float64)
    if not np.isfinite(p2).all():
        raise DatasetFormatError(f"{context}: 'p2' has non-finite values")
    return p2


class _ImageFinder:
    """``data/<folder>/<name>``; failing that, an image with the name's stem (a converted copy)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._by_stem: Optional[dict[str, Path]] = None

    def __call__(self, name: str) -> Optional[Path]:
        path = self.folder / name
        if path.is_file():
            return path
        if self._by_stem is None:
            self._by_stem = index_images(self.folder)
        return self._by_stem.get(_stem(name))


def _stem(name: str) -> str:
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix else name


def _selected_rows(split: str, count: int, names_file: Path) -> list[int]:
    if split not in SPINE_HOLDOUT_ROWS:
        return list(range(count))
    if count != SPINE_HOLDOUT_NUM_ROWS:
        raise DatasetFormatError(f"{names_file}: the spine holdout split is defined on the "
                                 f"{SPINE_HOLDOUT_NUM_ROWS} rows of the distributed training list, this one has "
                                 f"{count}")
    return [row for start, stop in SPINE_HOLDOUT_ROWS[split] for row in range(start, stop)]


# ---------------------------------------------------------------------------
# Public readers


def spine_holdout_split(root) -> dict[str, list[str]]:
    """The image names (as in ``labels/training/filenames.csv``) of each holdout part.

    ``{"holdout_train": [...361 names], "holdout_val": [...40], "holdout_test": [...80]}``,
    from the rows :data:`SPINE_HOLDOUT_ROWS`; reads only ``filenames.csv``.
    """
    labels, _ = _folders(Path(root), "holdout_train")
    names_file = labels / "filenames.csv"
    names = _read_names(names_file)
    return {part: [names[r] for r in _selected_rows(part, len(names), names_file)] for part in SPINE_HOLDOUT_ROWS}


def spine_records(root, split: str = "train", strict: bool = False) -> list[SpineRecord]:
    """Records of the AASCE / BoostNet spine data (see the module docstring for layout and splits).

    Landmarks in original pixels from the ``.mat`` files (checked against ``landmarks.csv``
    where present), spacing NaN, ``angles`` from ``angles.csv`` (NaN without it) and the
    image's ``original_size``.  Rows whose image is absent are skipped with one warning
    (``strict=True``: an error).
    """
    _check_split(split)
    root = Path(root)
    labels, images = _folders(root, split)
    names_file = labels / "filenames.csv"
    names = _read_names(names_file)
    csv_file, angles_file = labels / "landmarks.csv", labels / "angles.csv"
    fractions = _read_table(csv_file, names, 2 * SPINE_NUM_LANDMARKS, "x1..x68, y1..y68") \
        if csv_file.is_file() else None
    angles = _read_table(angles_file, names, SPINE_NUM_ANGLES, "Cobb angles") if angles_file.is_file() else None
    records, missing, find = [], [], _ImageFinder(images)
    for row in _selected_rows(split, len(names), names_file):
        name = names[row]
        path = find(name)
        if path is None:
            missing.append(name)
            continue
        points = _read_mat(labels / f"{name}.mat", row, names_file)
        size = image_size_of(path)
        if fractions is not None:
            scaled = np.stack([fractions[row, :SPINE_NUM_LANDMARKS] * size[1],
                               fractions[row, SPINE_NUM_LANDMARKS:] * size[0]], axis=1)
            error = np.abs(scaled - points).max(axis=1)
            worst = int(np.argmax(np.where(np.isnan(error), np.inf, error)))
            if not error[worst] <= SPINE_CSV_TOLERANCE_PX:
                raise fail(csv_file, row + 1,
                           f"landmark {worst + 1} of {name!r} is at {scaled[worst].round(2).tolist()} px "
                           f"(fractions times the image's {size[1]} x {size[0]}), its .mat file says "
                           f"{points[worst].tolist()}: more than {SPINE_CSV_TOLERANCE_PX:g} px apart")
        records.append(SpineRecord(
            _stem(name), path, points, source=f"{labels / (name + '.mat')} (row {row + 1} of {names_file})",
            angles=angles[row].copy() if angles is not None else np.full(SPINE_NUM_ANGLES, np.nan),
            original_size=(int(size[0]), int(size[1]))))
    report_missing_images("spine", missing, str(images), strict)
    return records


def spine_angles(root, split: str = "train", strict: bool = False) -> dict[str, tuple[np.ndarray, int]]:
    """``{record id: (angles (3,) in degrees, original image height in px)}`` for the split's images.

    The ground truth of the challenge's clinical target, for evaluating angles computed by
    :func:`coorkern.metrics.cobb_angles` from predicted landmarks (which needs the height).
    """
    return {r.id: (r.angles, r.image_height) for r in spine_records(root, split, strict=strict)}
