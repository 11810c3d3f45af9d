"""Helpers shared by the dataset modules: the error type, argument checks, text-file parsing."""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["DatasetFormatError"]


class DatasetFormatError(ValueError):
    """A dataset file is missing, unreadable or not in the expected format."""


def where(path, line: Optional[int] = None) -> str:
    return f"{path}, line {line}" if line is not None else str(path)


def fail(path, line: Optional[int], message: str) -> DatasetFormatError:
    return DatasetFormatError(f"{where(path, line)}: {message}")


def parse_float(text: str, path, line: int) -> float:
    text = text.strip()
    if text.lower() in ("", "nan"):
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise fail(path, line, f"expected a number, got {text!r}") from None


def check_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise TypeError(f"image_size must be an int or (H, W), got {image_size!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"image_size must be at least 8x8, got {(h, w)}")
    return h, w


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per image (over all but the leading dims)."""
    flat = image.flatten(-2)
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, keepdim=True).clamp_min(1e-6)
    return ((flat - mean) / std).view_as(image)


@contextlib.contextmanager
def single_thread():
    """Run many small tensor ops on one thread (restored afterwards).

    Rendering is thousands of small element-wise ops; on a 2-core machine shared with
    other work, a second intra-op thread made it ~40x slower (62 vs 1.5 ms per 64x64 image).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_for(*parts) -> int:
    """A 63-bit seed from any hashable description (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------
# Annotation files


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: annotation file not found")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read annotation file ({exc})") from exc


def parse_points(lines: Sequence[str], path: Path, count: int, first_line: int = 1, sep=",") -> np.ndarray:
    """``count`` lines of ``x<sep>y`` starting at (1-based) ``first_line``; later lines are ignored."""
    points = []
    for k in range(count):
        line_no = first_line + k
        if line_no > len(lines):
            raise fail(path, line_no, f"expected {count} landmark lines, the file ends after line {len(lines)}")
        parts = lines[line_no - 1].replace(sep, " ").split()
        if len(parts) != 2:
            raise fail(path, line_no, f"expected 'x{sep}y', got {lines[line_no - 1]!r}")
        points.append([parse_float(p, path, line_no) for p in parts])
    return np.asarray(points, dtype=np.float64)


def is_header(cells: Sequence[str]) -> bool:
    """A CSV row is a header when its second cell is not a number (the first is an image name)."""
    if len(cells) < 2:
        return False
    try:
        float(cells[1])
    except ValueError:
        return True
    return False


# x0/y0 and x1/y1 (0- or 1-based numbering), 1_x/1_y, x_1/y_1: the usual spellings of landmark columns.
_COORDINATE_COLUMN = re.compile(r"^(?:(?P<axis>[xy])_?(?P<index>\d+)|(?P<index2>\d+)_?(?P<axis2>[xy]))$")


def landmark_columns(header: Sequence[str], path, line: int = 1) -> list[tuple[int, int]]:
    """``(x column, y column)`` per landmark, in landmark order, from a header row.

    Accepts ``x0,y0,...`` (0- or 1-based), ``1_x,1_y,...`` and ``x_1,y_1,...``, in any
    column order and case; every landmark needs both its x and its y column.
    """
    found: dict[int, dict[str, int]] = {}
    for col, name in enumerate(header):
        m = _COORDINATE_COLUMN.match(name.strip().lower())
        if m:
            axis = m.group("axis") or m.group("axis2")
            index = int(m.group("index") or m.group("index2"))
            if axis in found.setdefault(index, {}):
                raise fail(path, line, f"column {name!r} appears twice")
            found[index][axis] = col
    if not found:
        raise fail(path, line, "expected landmark columns named x0,y0,... (or x1,y1 / 1_x,1_y / x_1,y_1), "
                               f"got {list(header)}")
    incomplete = [i for i, axes in sorted(found.items()) if len(axes) != 2]
    if incomplete:
        raise fail(path, line, f"landmark {incomplete[0]} has only one of its x and y columns")
    return [(found[i]["x"], found[i]["y"]) for i in sorted(found)]


def fraction_split(items: list, split: str, train_fraction: float, name: str) -> list:
    if split == "all":
        return items
    cut = int(round(len(items) * train_fraction))
    if split == "train":
        return items[:cut]
    if split in ("test", "val"):
        return items[cut:]
    raise ValueError(f"{name} split must be 'train', 'test' ('val') or 'all', got {split!r}")


def report_missing_images(name: str, missing_ids: Sequence[str], where_: str, strict: bool) -> None:
    """Annotated images that are absent: an error with ``strict``, else one warning naming them."""
    if not missing_ids:
        return
    first = ", ".join(missing_ids[:5]) + (", ..." if len(missing_ids) > 5 else "")
    message = f"{name}: {len(missing_ids)} annotated image(s) not found under {where_} ({first})"
    if strict:
        raise DatasetFormatError(message + "; strict=True")
    warnings.warn(message + "; skipped them (strict=True makes this an error)", stacklevel=4)
