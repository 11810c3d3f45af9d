"""Landmark datasets: a built-in synthetic radiograph generator and the public formats.

One entry point, :func:`load_dataset`, returns a ``torch.utils.data.Dataset`` whose
items are dicts::

    image      float32 (1, H, W), per-image normalized (zero mean, unit std)
    landmarks  float32 (L, 2), (x, y) in the resized image's pixels (pixel centres
               at integer coordinates, the convention of the central loss); NaN = missing
    spacing    float32 (2,), mm per resized pixel in x and y, NaN where unknown
    id         str

Datasets (``name``), one module each:

* ``synthetic`` (:mod:`.synthetic`; default, nothing downloaded) -- procedural cephalograms.
* ``isbi2015`` (:mod:`.isbi2015`) -- ISBI 2015 cephalometric challenge in the original
  layout, the "cepha400" JPEG mirror or Payer's CSVs; 0.1 mm/pixel; annotator ``mean``
  of the two doctors (default when both are there), ``senior``, ``junior``, ``challenge``;
  splits ``train``/``test``/``test1``/``test2``.
* ``hand`` (:mod:`.hand`) -- Digital Hand Atlas (``.mha`` or ``.jpg``) with Payer's
  ``all.csv``; spacing from the wrist width; the published ``cv_fold`` lists.
* ``chest`` (:mod:`.chest`) -- Shenzhen chest X-rays, six landmarks as fractions; no spacing.
* ``spine`` (:mod:`.spine`) -- AASCE 2019 / BoostNet spine X-rays, 68 vertebra corners from
  the ``.mat`` files, the three Cobb angles per record, no spacing (pixels); splits
  ``train``/``test`` and the fixed development holdout ``holdout_train``/``holdout_val``/
  ``holdout_test``.
* ``csv`` (:mod:`.table`) -- generic CSV or JSON in the usual column conventions.

Images (:mod:`.images`): BMP/PNG/JPEG/TIFF through Pillow; MetaImage, NRRD, NIfTI and
DICOM through SimpleITK, with their header spacing (:func:`read_image_with_spacing`).
Augmentation: :mod:`.augment`; the ``Dataset`` over files: :mod:`.dataset`.

Errors in annotations or images are :class:`DatasetFormatError` naming the file and, for
text formats, the line.
"""

from ._common import DatasetFormatError, check_size, normalize, seed_for, single_thread
from .augment import augment_sample, warp_affine
from .chest import chest_records
from .dataset import LandmarkDataset, Record, collate, resize_landmarks
from .hand import hand_records
from .images import IMAGE_EXTENSIONS, image_size_of, read_image, read_image_with_spacing
from .isbi2015 import ISBI_ANNOTATORS, ISBI_SPLITS, isbi2015_records
from .loading import DATASETS, DEFAULT_IMAGE_SIZE, DEFAULT_THRESHOLDS, load_dataset
from .spine import SPINE_HOLDOUT_ROWS, SPINE_SPLITS, SpineRecord, spine_angles, spine_holdout_split, spine_records
from .synthetic import (
    NUM_SYNTHETIC_LANDMARKS,
    SyntheticLandmarks,
    _canonical_to_image,
    _draw_params,
    _image_to_canonical,
    render_synthetic,
)
from .table import csv_records

# The names these helpers had when coorkern.data was one module.
_normalize, _seed_for, _check_size = normalize, seed_for, check_size

__all__ = [
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_THRESHOLDS",
    "DatasetFormatError",
    "IMAGE_EXTENSIONS",
    "ISBI_ANNOTATORS",
    "ISBI_SPLITS",
    "LandmarkDataset",
    "NUM_SYNTHETIC_LANDMARKS",
    "Record",
    "SyntheticLandmarks",
    "augment_sample",
    "chest_records",
    "collate",
    "csv_records",
    "hand_records",
    "image_size_of",
    "isbi2015_records",
    "load_dataset",
    "read_image",
    "read_image_with_spacing",
    "render_synthetic",
    "resize_landmarks",
    "single_thread",
    "SPINE_HOLDOUT_ROWS",
    "SPINE_SPLITS",
    "SpineRecord",
    "spine_angles",
    "spine_holdout_split",
    "spine_records",
    "warp_affine",
]
