"""``load_dataset``: a data set's name, root and split to a torch ``Dataset``."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ._common import DatasetFormatError, check_size
from .chest import CHEST_THRESHOLDS, chest_records
from .dataset import LandmarkDataset
from .hand import HAND_THRESHOLDS, hand_records
from .isbi2015 import ISBI_THRESHOLDS, isbi2015_records
from .spine import SPINE_THRESHOLDS, spine_records
from .synthetic import SYNTHETIC_THRESHOLDS, SyntheticLandmarks
from .table import csv_records

__all__ = ["DATASETS", "DEFAULT_IMAGE_SIZE", "DEFAULT_THRESHOLDS", "load_dataset"]

DATASETS = ("synthetic", "isbi2015", "hand", "chest", "spine", "csv")
# The paper's training sizes (H, W); synthetic: the quick-run default.
DEFAULT_IMAGE_SIZE = {
    "synthetic": (256, 256),
    "isbi2015": (512, 416),
    "hand": (512, 384),
    "chest": (512, 512),
    # Provisional: the median spine image is 854 x 2360 (H/W 2.7); 768 x 288 keeps that ratio
    # (a vertebra ~29 px tall) at about the pixel count of isbi2015's size.
    "spine": (768, 288),
    "csv": (512, 512),
}
# SDR radii per dataset (mm, or px where the spacing is unknown).
DEFAULT_THRESHOLDS = {
    "synthetic": SYNTHETIC_THRESHOLDS,
    "isbi2015": ISBI_THRESHOLDS,
    "hand": HAND_THRESHOLDS,
    "chest": CHEST_THRESHOLDS,
    "spine": SPINE_THRESHOLDS,
    "csv": (2.0, 2.5, 3.0, 4.0),
}
_RECORD_READERS = {"isbi2015": isbi2015_records, "hand": hand_records, "chest": chest_records, "spine": spine_records,
                   "csv": csv_records}


def load_dataset(name: str = "synthetic", root=None, split: str = "train", image_size=None, **options) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`) as a torch ``Dataset`` of dicts.

    ``image_size`` is ``(H, W)`` (default: :data:`DEFAULT_IMAGE_SIZE`).  ``options``:
    ``augment`` (bool or a dict of :func:`augment_sample` ranges), ``seed`` and ``cache``
    (keep the resized images in memory) for every dataset; ``thresholds``; plus per
    dataset: synthetic ``num_samples``, ``difficulty``; isbi2015 ``protocol``
    (``paper``/``challenge``), ``annotator`` (``mean``/``senior``/``junior``/``challenge``),
    ``annotations`` (a file or folder), ``strict``; hand ``cv_fold``, ``wrist_indices``,
    ``wrist_mm``, ``landmark_indices``, ``train_fraction``, ``strict``; chest
    ``train_fraction``; spine ``strict`` (splits ``train``, ``test``, ``holdout_train``,
    ``holdout_val``, ``holdout_test``: see :mod:`.spine`); csv ``file``, ``train_fraction``.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {DATASETS}, got {name!r}")
    image_size = check_size(image_size if image_size is not None else DEFAULT_IMAGE_SIZE[name])
    thresholds = tuple(options.pop("thresholds", None) or DEFAULT_THRESHOLDS[name])
    if name == "synthetic":
        ds = SyntheticLandmarks(split, image_size, **options)
        ds.thresholds = thresholds
        return ds
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the folder with the data set's files)")
    if not Path(root).exists():
        raise DatasetFormatError(f"{root}: dataset root not found")
    augment = options.pop("augment", False)
    seed = options.pop("seed", 0)
    cache = options.pop("cache", False)
    records = _RECORD_READERS[name](root, split=split, **options)
    return LandmarkDataset(records, image_size, augment=augment, seed=seed, thresholds=thresholds, name=name,
                           cache=cache)
