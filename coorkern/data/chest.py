"""Shenzhen chest X-rays: six landmarks per image as fractions of its size; spacing unknown."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import DatasetFormatError, fail, fraction_split, parse_points, read_lines
from .dataset import Record
from .images import index_images

__all__ = ["CHEST_THRESHOLDS", "chest_records"]

CHEST_THRESHOLDS = (3.0, 6.0, 9.0)  # SDR radii in pixels (no spacing)


def chest_records(root, split="train", train_fraction=229 / 279):
    """Shenzhen chest: ``CHNCXR_*.png`` with a ``CHNCXR_*.txt`` (``6`` then six ``x y`` fractions)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: chest data folder not found")
    images = index_images(root, "CHNCXR_*")
    labels = {p.stem: p for p in sorted(root.rglob("CHNCXR_*.txt"))}
    if not labels:
        raise DatasetFormatError(f"{root}: no CHNCXR_*.txt label files found")
    records = []
    for stem, label in sorted(labels.items()):
        lines = read_lines(label)
        header = lines[0].strip() if lines else ""
        if not header.isdigit():
            raise fail(label, 1, f"expected the landmark count, got {header!r}")
        points = parse_points(lines, label, int(header), first_line=2, sep=" ")
        if np.any((points < 0) | (points > 1)):
            raise fail(label, 2, "landmarks must be fractions of the image width/height in [0, 1]")
        path = images.get(stem, label.with_suffix(".png"))
        records.append(Record(stem, path, points, source=str(label), relative=True))
    return fraction_split(records, split, train_fraction, "chest")
