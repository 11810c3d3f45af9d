"""Writers of tiny fixture files in each public data set's exact layout (shared by the tests)."""

import numpy as np
import pytest
from PIL import Image as PIL


def save_image(path, h, w, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    array = (rng.random((h, w)) * 255).astype(np.uint8)
    image = PIL.fromarray(array, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    image.save(path)


def isbi_fixture(root, ids=(1, 2, 151), size=(60, 50)):
    pts = {}
    for n in ids:
        stem = f"{n:03d}"
        folder = "TrainingData" if n <= 150 else "Test1Data"
        save_image(root / "RawImage" / folder / f"{stem}.bmp", *size)
        base = np.stack([np.arange(19) * 2.0 + n, np.arange(19) + 10.0], 1)
        for who, shift in (("senior", 0.0), ("junior", 2.0)):
            lines = [f"{x + shift:g},{y - shift:g}" for x, y in base] + ["1", "2", "3"]  # + classification lines
            path = root / "AnnotationsByMD" / f"400_{who}" / f"{stem}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
        pts[stem] = base + np.array([1.0, -1.0])  # mean of the two doctors
    return pts


def hand_fixture(root, n=3, size=(40, 30), suffix=".jpg"):
    """``all.csv`` + ``images/<id><suffix>`` (``.mha``: 8-bit, ``DimSize = W H 1`` and an
    ElementSpacing of 0.1, like Payer's files)."""
    rows = []
    for i in range(n):
        coords = np.stack([np.linspace(2, 25, 37), np.linspace(3, 35, 37)], 1) + i
        coords[5] = coords[1] + np.array([3.0, 4.0])  # wrist width: 5 px
        rows.append(f"{1000 + i}," + ",".join(f"{v:g}" for v in coords.reshape(-1)))
        if suffix == ".mha":
            array = (np.random.default_rng(i).random((1, *size)) * 255).astype(np.uint8)
            write_itk(root / "images" / f"{1000 + i}.mha", array, spacing=(0.1, 0.1))
        else:
            save_image(root / "images" / f"{1000 + i}{suffix}", *size, mode="RGB")
    (root / "all.csv").write_text("\n".join(rows) + "\n")
    return rows


def chest_fixture(root, n=3, size=(40, 60)):
    for i in range(n):
        save_image(root / "pngs" / f"CHNCXR_{i:04d}_0.png", *size)
        label = root / "labels" / f"CHNCXR_{i:04d}_0.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("6\n" + "\n".join(f"{0.1 * k + 0.05:.3f} {0.5 - 0.05 * k:.3f}" for k in range(6)) + "\n")


def isbi_mirror_fixture(root, ids=(2, 1, 3), size=(60, 50), junior=False):
    """The "cepha400" mirror: ``cepha400/NNN.jpg`` + ``train_senior.csv`` (header ``image_path,1_x,1_y,...``,
    rows in the given order, pixels) + a ``test1_senior.csv`` whose images are absent, as distributed.
    With ``junior``, also Payer's ``payer/all_junior.csv`` (no header, mm).  Returns {stem: senior (19, 2)}."""
    header = "image_path," + ",".join(f"{k}_x,{k}_y" for k in range(1, 20))
    pts, rows, payer = {}, [], []
    for n in ids:
        stem = f"{n:03d}"
        save_image(root / "cepha400" / f"{stem}.jpg", *size, mode="RGB")
        pts[stem] = np.stack([np.arange(19) * 2.0 + n, np.arange(19) + 10.0], 1)
        rows.append(f"{stem}.jpg," + ",".join(f"{v:g}" for v in pts[stem].reshape(-1)))
        payer.append(f"{stem}," + ",".join(f"{v / 10:g}" for v in (pts[stem] + [2.0, -2.0]).reshape(-1)))
    (root / "train_senior.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    absent = np.arange(38) + 100.0
    (root / "test1_senior.csv").write_text(header + "\n151.jpg," + ",".join(f"{v:g}" for v in absent) + "\n")
    if junior:
        (root / "payer").mkdir(exist_ok=True)
        (root / "payer" / "all_junior.csv").write_text("\n".join(payer) + "\n")
    return pts


def write_itk(path, array, spacing=(0.5, 0.25)):
    """An image written by SimpleITK (format from the suffix: .mha, .nrrd, .nii.gz, ...)."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing) + (1.0,) * (image.GetDimension() - 2))
    sitk.WriteImage(image, str(path))


def write_dicom(path, array, photometric="MONOCHROME2", slope=1.0, intercept=0.0, pixel_spacing=None,
                imager_pixel_spacing=None, pixels=True):
    """A 16-bit unsigned DICOM radiograph written with pydicom; spacings as DICOM lists them (row, column)."""
    pytest.importorskip("pydicom")  # in the test extra; only the fixtures need it (SimpleITK reads DICOM)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    array = np.asarray(array, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing)
    if pixels:
        ds.PixelData = array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
