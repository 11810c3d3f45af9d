"""Reading radiographs: Pillow for the ordinary formats, SimpleITK for the medical ones.

* BMP/PNG/JPEG/TIFF (and whatever else Pillow identifies): grey ``[0, 1]`` (colour is
  converted to grey, 16-bit divided by 65535); no physical spacing.
* MetaImage (``.mha/.mhd``), NRRD (``.nrrd/.nhdr``), NIfTI (``.nii/.nii.gz``), 2-D or a
  single slice: through SimpleITK; spacing from the header.
* DICOM (``.dcm``, or any file with the ``DICM`` preamble, extension or not): through
  SimpleITK's GDCM reader, which applies RescaleSlope/Intercept and maps MONOCHROME1 to
  MONOCHROME2 (inverted, so bone is bright as in every other format).  Spacing from
  PixelSpacing, else ImagerPixelSpacing, else none.

8-bit medical images are scaled to ``[0, 1]`` like Pillow's; wider ones keep their (rescaled)
values as float32, so a 16-bit range is not squeezed to 8 bits.  Datasets normalize each
image to zero mean and unit variance, so only relative values matter.  Spacings are
``(x, y)`` in mm per pixel.  Unreadable, truncated or corrupt files raise
:class:`DatasetFormatError` naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ._common import DatasetFormatError

__all__ = ["IMAGE_EXTENSIONS", "image_size_of", "read_image", "read_image_with_spacing"]

PILLOW_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
ITK_EXTENSIONS = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")
IMAGE_EXTENSIONS = PILLOW_EXTENSIONS + DICOM_EXTENSIONS + ITK_EXTENSIONS

_DICOM_PIXEL_SPACING = "0028|0030"  # row spacing \ column spacing (mm)
_DICOM_IMAGER_PIXEL_SPACING = "0018|1164"  # same, at the detector (projection radiographs)


def suffix_of(path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _is_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _reader_kind(path: Path) -> str:
    suffix = suffix_of(path)
    if suffix in PILLOW_EXTENSIONS:
        return "pillow"
    if suffix in DICOM_EXTENSIONS or _is_dicom(path):
        return "dicom"
    if suffix in ITK_EXTENSIONS:
        return "itk"
    return "pillow"  # Pillow identifies files by content; it names what it cannot read


def _require_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: image file not found")
    return path


# ---------------------------------------------------------------------------
# Pillow


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decodes now: a truncated file fails here, not later
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float32)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(array.max()), 1.0)
                array = array / top
            elif img.mode == "F":
                array = np.asarray(img, dtype=np.float32)
            else:
                array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: cannot read image ({exc})") from exc
    if array.ndim != 2:
        raise DatasetFormatError(f"{path}: expected a grey or colour image, got array shape {array.shape}")
    return array


def _pillow_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as exc:
        raise DatasetFormatError(f"{path}: cannot read image ({exc})") from exc
    return h, w


# ---------------------------------------------------------------------------
# SimpleITK


def _itk_reason(exc: Exception) -> str:
    """ITK's message without its source-file locations."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    kept = [ln for ln in lines if not ln.startswith("Exception thrown") and ".cxx:" not in ln and ".h:" not in ln]
    return " ".join(kept or lines)[:300]


def _itk_reader(path: Path, kind: str):
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - SimpleITK is a dependency
        raise ImportError(f"reading {path} needs SimpleITK: pip install SimpleITK") from exc
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if kind == "dicom":
        reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DatasetFormatError(f"{path}: cannot read image ({_itk_reason(exc)})") from exc
    size = reader.GetSize()
    if len(size) not in (2, 3) or (len(size) == 3 and size[2] != 1):
        raise DatasetFormatError(f"{path}: expected a 2-D image (or a single slice), got size {tuple(size)}")
    return reader


def _text_header(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(65536)
    return head.split(b"\n\n", 1)[0].decode("latin-1")


def _header_declares_spacing(path: Path) -> bool:
    """MetaImage and NRRD headers may omit the spacing (ITK then reports 1 mm): check the text."""
    suffix = suffix_of(path)
    if suffix in (".mha", ".mhd"):
        keys = {ln.split("=", 1)[0].strip().lower() for ln in _text_header(path).splitlines() if "=" in ln}
        return bool(keys & {"elementspacing", "elementsize"})
    if suffix in (".nrrd", ".nhdr"):
        keys = {ln.split(":", 1)[0].strip().lower() for ln in _text_header(path).splitlines() if ":" in ln}
        return bool(keys & {"spacings", "space directions"})
    return True  # NIfTI always stores pixdim


def _positive_pair(values, path: Path, what: str) -> tuple[float, float]:
    if len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in values[:2]):
        raise DatasetFormatError(f"{path}: {what} must be two positive numbers, got {values}")
    return float(values[0]), float(values[1])


def _itk_spacing(reader, path: Path, kind: str) -> Optional[tuple[float, float]]:
    if kind == "dicom":
        for tag, what in ((_DICOM_PIXEL_SPACING, "PixelSpacing"), (_DICOM_IMAGER_PIXEL_SPACING, "ImagerPixelSpacing")):
            if reader.HasMetaDataKey(tag):
                text = reader.GetMetaData(tag).strip()
                try:
                    values = [float(v) for v in text.split("\\")]
                except ValueError:
                    raise DatasetFormatError(f"{path}: {what} must be numbers, got {text!r}") from None
                row, column = _positive_pair(values, path, what)
                return column, row  # DICOM lists the row (y) spacing first
        return None  # GDCM reports 1 mm when neither tag is present: not a measurement
    if not _header_declares_spacing(path):
        return None
    return _positive_pair(list(reader.GetSpacing()[:2]), path, "the header spacing")


def _read_itk(path: Path, kind: str) -> tuple[np.ndarray, Optional[tuple[float, float]]]:
    import SimpleITK as sitk

    reader = _itk_reader(path, kind)
    spacing = _itk_spacing(reader, path, kind)
    try:
        image = reader.Execute()
    except RuntimeError as exc:  # truncated payload, no pixel data, unsupported compression
        raise DatasetFormatError(f"{path}: cannot read image ({_itk_reason(exc)})") from exc
    eight_bit = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkVectorUInt8)
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (y, x), (1, y, x), maybe with components last
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array.mean(-1)
    array = array.reshape(array.shape[-2:])
    if eight_bit:
        array /= 255.0
    return array, spacing


# ---------------------------------------------------------------------------
# Public readers


def read_image_with_spacing(path) -> tuple[torch.Tensor, Optional[tuple[float, float]]]:
    """Grey float32 image ``(1, H, W)`` and the file's spacing ``(x, y)`` in mm per pixel, or None.

    The spacing comes from the file's header (DICOM PixelSpacing/ImagerPixelSpacing,
    MetaImage/NRRD/NIfTI spacing); formats without one (BMP/PNG/JPEG/TIFF) give None.
    """
    path = _require_file(path)
    kind = _reader_kind(path)
    if kind == "pillow":
        array, spacing = _read_pillow(path), None
    else:
        array, spacing = _read_itk(path, kind)
    if not np.isfinite(array).all():
        raise DatasetFormatError(f"{path}: the image contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array))[None], spacing


def read_image(path) -> torch.Tensor:
    """Grey float32 image ``(1, H, W)`` of any supported format (see the module docstring)."""
    return read_image_with_spacing(path)[0]


def image_size_of(path) -> tuple[int, int]:
    """(H, W) of an image file from its header (the pixels are not decoded)."""
    path = _require_file(path)
    kind = _reader_kind(path)
    if kind == "pillow":
        return _pillow_size(path)
    size = _itk_reader(path, kind).GetSize()
    return int(size[1]), int(size[0])


def index_images(folder: Path, pattern: str = "*") -> dict[str, Path]:
    """Image files under ``folder`` (recursively) by file stem; the first in sorted order wins."""
    found: dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.rglob(pattern)):
            suffix = suffix_of(p)
            if suffix in IMAGE_EXTENSIONS and p.is_file():
                found.setdefault(p.name[: -len(suffix)], p)
    return found
