"""Which images a training run trains on, selects its checkpoint on and reports: the splits of ``coorkern train``.

The best epoch and the conformal radii are chosen on a validation part; when that part is
the reported test split (the published ISBI/hand/chest protocols do this), the reported
metrics and coverage are optimistic.  The default here keeps them apart:

* synthetic data has its own ``val`` split;
* the ISBI 2015 challenge protocol selects on ``test1`` and reports ``test2``;
* every other real data set selects on a part **carved** from its training split
  (``--val-split carved``): the last ``--val-fraction`` (default 10%) of the training
  images in the data set's own order, at least one -- deterministic, and listed by id in
  the run's ``config.json`` (``splits``).  ISBI 2015 (paper protocol, images 1-150):
  train 1-135, validation 136-150, test 151-400.  The spine selects on its case-disjoint
  ``holdout_val`` rows instead (:data:`coorkern.data.SPINE_HOLDOUT_ROWS`), trains on the
  other training rows and reports ``test``; a copy without the test folder trains on
  ``holdout_train`` and reports ``holdout_test``.

``--val-split test`` (or any named split) still selects on that split; :func:`selection`
names what selected the checkpoint in the run's report, with ``(optimistic)`` when it is
the reported split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import data as data_mod

__all__ = ["CARVED", "SPLITS", "default_splits", "spine_has_test", "carve_validation", "selection"]

CARVED = "carved"  # --val-split: a validation part carved from the training split
SPLITS = {  # (train, validation for model selection, final test) per dataset
    "synthetic": ("train", "val", "test"),
    "isbi2015": ("train", CARVED, "test"),
    "hand": ("train", CARVED, "test"),
    "chest": ("train", CARVED, "test"),
    "spine": ("train", CARVED, "test"),
    "csv": ("train", CARVED, "test"),
}
SPINE_WITHOUT_TEST = ("holdout_train", "holdout_val", "holdout_test")


def spine_has_test(root) -> bool:
    """Whether the spine copy under ``root`` has the test images and labels (``data/test``, ``labels/test``)."""
    if not root:
        return False
    root = Path(root)
    for base in [root, *sorted(p.parent for p in root.glob("*/labels"))]:
        if (base / "labels").is_dir():
            return (base / "labels" / "test").is_dir() and (base / "data" / "test").is_dir()
    return False


def default_splits(data: str, root=None, protocol: Optional[str] = None) -> tuple[str, str, str]:
    """``(train, validation, test)`` split names of ``coorkern train --data data`` without split options."""
    if data == "isbi2015" and protocol == "challenge":
        return "train", "test1", "test2"
    if data == "spine" and not spine_has_test(root):
        return SPINE_WITHOUT_TEST
    return SPLITS[data]


def _subset(dataset, records: list, augment):
    return data_mod.LandmarkDataset(records, dataset.image_size, augment=augment, seed=dataset.seed,
                                    thresholds=dataset.thresholds, name=dataset.name, cache=dataset.cache is not None)


def _spine_validation_ids(dataset, root) -> Optional[set]:
    """The ids of the spine's ``holdout_val`` rows, when the copy has the distributed 481-row list."""
    try:
        names = data_mod.spine_holdout_split(root)["holdout_val"]
    except data_mod.DatasetFormatError:
        return None
    stems = {Path(name).stem if Path(name).suffix else name for name in names}
    ids = {rec.id for rec in dataset.records}
    return stems & ids or None


def carve_validation(dataset, fraction: float, data: str, root=None) -> tuple:
    """Split a training data set into ``(train part, validation part, rule)``.

    The validation part is the last ``fraction`` of ``dataset.records`` (rounded, at least
    one image, at least one left to train), without augmentation; for the spine, the rows
    of ``holdout_val`` when the copy has them.  ``rule`` says in words which images it took.
    """
    records = getattr(dataset, "records", None)
    if records is None:
        raise ValueError(f"--val-split {CARVED} carves from image files; {data} data has its own 'val' split")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    spine_ids = _spine_validation_ids(dataset, root) if data == "spine" else None
    if spine_ids:
        val = [r for r in records if r.id in spine_ids]
        rule = f"the spine's case-disjoint holdout_val rows ({len(val)} images)"
    else:
        count = max(1, round(len(records) * fraction))
        if count >= len(records):
            raise ValueError(f"--val-split {CARVED}: the training split has {len(records)} image(s); carving "
                             f"{count} for validation leaves none to train on")
        val = list(records[-count:])
        rule = f"the last {fraction:.0%} of the training images ({count}, in the data set's order)"
    chosen = {id(r) for r in val}
    train = [r for r in records if id(r) not in chosen]
    augment = dataset.augment if dataset.augment is not None else False
    return _subset(dataset, train, augment), _subset(dataset, val, False), rule


def selection(val_split: str, test_split: str, rule: Optional[str] = None) -> str:
    """What selected the checkpoint and calibrated the radii, for the run's report."""
    if val_split == test_split:
        return f"{val_split} (optimistic)"
    if val_split == CARVED and rule:
        return f"{CARVED}: {rule}"
    return val_split
