"""Annotated images on disk as a torch ``Dataset``: resizing, landmark and spacing scaling, batching."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._common import DatasetFormatError, check_size, normalize
from .augment import _Augmenting
from .images import image_size_of, read_image_with_spacing

__all__ = ["LandmarkDataset", "Record", "collate", "resize_landmarks"]

NAN_SPACING = (float("nan"), float("nan"))


@dataclass
class Record:
    """One annotated image: landmarks in original pixels; spacing in mm per original pixel.

    A NaN spacing means the annotations give none: the image file's header spacing (DICOM,
    MetaImage, NRRD, NIfTI) is used when it has one.  Data sets with a spacing convention
    (ISBI 2015: 0.1 mm; hand: the wrist width) always set it, so a header never overrides it.
    """

    id: str
    image_path: Path
    landmarks: np.ndarray  # (L, 2); may be fractions of the size when ``relative``
    spacing: tuple[float, float] = NAN_SPACING
    source: str = ""  # where the annotation came from, for error messages
    relative: bool = False  # landmarks are fractions of (W, H)


def resize_landmarks(record: Record, original_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """The record's landmarks (float64) on the ``image_size`` grid of a resized ``original_size`` image.

    Pixel centres sit at integer coordinates, so ``x_new + 0.5 = (x_old + 0.5) * w / ow``
    (the convention of ``F.interpolate(..., align_corners=False)``).
    """
    (oh, ow), (h, w) = original_size, image_size
    lm = torch.as_tensor(record.landmarks, dtype=torch.float64)
    if record.relative:
        lm = lm * torch.tensor([ow, oh], dtype=torch.float64)
    return (lm + 0.5) * torch.tensor([w / ow, h / oh], dtype=torch.float64) - 0.5


def resize_spacing(spacing: Sequence[float], original_size: tuple[int, int], image_size: tuple[int, int]):
    """mm per resized pixel from mm per original pixel."""
    (oh, ow), (h, w) = original_size, image_size
    return torch.tensor(spacing, dtype=torch.float64) * torch.tensor([ow / w, oh / h], dtype=torch.float64)


class LandmarkDataset(_Augmenting):
    """Images from disk resized to ``image_size`` with landmarks and spacing scaled accordingly."""

    def __init__(
        self,
        records: Sequence[Record],
        image_size=(512, 512),
        augment: bool | dict = False,
        seed: int = 0,
        thresholds: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
        name: str = "csv",
        cache: bool = False,
    ) -> None:
        super().__init__(augment, seed)
        self.cache = {} if cache else None  # index -> resized item (decoding large PNGs every epoch is slow)
        if not records:
            raise DatasetFormatError(f"{name}: no annotated images found for this split")
        counts = {r.landmarks.shape[0] for r in records}
        if len(counts) != 1:
            raise DatasetFormatError(f"{name}: images have different numbers of landmarks: {sorted(counts)}")
        self.records = list(records)
        self.image_size = check_size(image_size)
        self.num_landmarks = counts.pop()
        self.thresholds = tuple(thresholds)
        self.name = name
        for r in self.records:
            if not r.image_path.is_file():
                raise DatasetFormatError(f"{r.image_path}: image file not found (annotated in {r.source})")

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict:
        """The resized, normalized item without augmentation."""
        if self.cache is not None and index in self.cache:
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.cache[index].items()}
        item = self._read(index)
        if self.cache is not None:
            self.cache[index] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        return item

    def _read(self, index: int) -> dict:
        rec = self.records[index]
        image, header_spacing = read_image_with_spacing(rec.image_path)
        original = tuple(image.shape[-2:])
        spacing = rec.spacing
        if all(math.isnan(s) for s in spacing) and header_spacing is not None:
            spacing = header_spacing
        if original != self.image_size:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", align_corners=False,
                                  antialias=True)[0]
        return {
            "image": normalize(image),
            "landmarks": resize_landmarks(rec, original, self.image_size).float(),
            "spacing": resize_spacing(spacing, original, self.image_size).float(),
            "id": rec.id,
        }

    def __getitem__(self, index: int) -> dict:
        return self._maybe_augment(index, self.load(index))

    def all_landmarks(self) -> torch.Tensor:
        """(N, L, 2) landmarks in resized pixels (reads each image's header for its size)."""
        return torch.stack([resize_landmarks(rec, image_size_of(rec.image_path), self.image_size).float()
                            for rec in self.records])


def collate(items: Sequence[dict]) -> dict:
    """Stack a list of items into a batch (ids stay a list)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "landmarks": torch.stack([it["landmarks"] for it in items]),
        "spacing": torch.stack([it["spacing"] for it in items]),
        "id": [it["id"] for it in items],
    }

