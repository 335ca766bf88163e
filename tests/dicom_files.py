"""DICOM files the tests write themselves with pydicom (no downloads): every kind a hospital export holds.

Each file carries identifying attributes whose values are unusual strings (`TAG_VALUES`), so that a grep of
everything the pipeline writes proves none of them leaked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian as PLAIN
from pydicom.uid import JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage

# Basic Text SR: a DICOM object with no pixel data (a report).
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


UID_ROOT = "1.2.826.0.1.3680043.8.498.7319"  # pydicom's UID root, then digits no generated UID here uses


def patient(n: int) -> dict[str, str]:
    """Identifying attributes of test patient n: values that occur nowhere else."""
    return {
        "PatientID": f"QXPID{n:04d}ZZ",
        "PatientName": f"Testperson^Quixotic{n:04d}",
        "PatientBirthDate": f"1931{(n % 12) + 1:02d}17",
        "InstitutionName": f"Hospital of Quarantine Xylophones {n:03d}",
        "StudyInstanceUID": f"{UID_ROOT}.1.{n}",
    }


# Fragments of every identifying value, so that a value written in part or reformatted (the family name alone,
# `^` as a space, a UID's tail) is found too; plus the per-image UIDs' root.
FRAGMENTS = ["QXPID", "Quixotic", "Xylophones", "Testperson", UID_ROOT, UID_ROOT.replace(".", "")]


def tag_values(patients: list[int]) -> list[str]:
    """Every identifying value written for these patients, and the fragments, for the privacy grep."""
    return [v for n in patients for v in patient(n).values()] + FRAGMENTS


_instances: dict[int, int] = {}


def instance_uid(n: int) -> str:
    """A deterministic SOP Instance UID under UID_ROOT for the next image of patient n."""
    _instances[n] = _instances.get(n, 0) + 1
    return f"{UID_ROOT}.3.{n}.{_instances[n]}"


def _dataset(sop_class: str, modality: str, patient_no: int) -> Dataset:
    """A dataset of `sop_class` with its file meta (uncompressed), a new instance UID and patient n's attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance_uid(patient_no)
    meta.TransferSyntaxUID = PLAIN
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    for keyword, value in patient(patient_no).items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_no: int = 1,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    slope: float | None = None,
    intercept: float | None = None,
    center: float | None = None,
    width: float | None = None,
    syntax: str = PLAIN,
    series_uid: str | None = None,
    extra: dict[str, object] | None = None,
) -> Path:
    """A Secondary Capture DICOM of `pixels` ((rows, cols) or (frames, rows, cols), unsigned) with the given
    stored bits, rescale, window and transfer syntax (compressed by pydicom's own RLE or openjpeg encoder)."""
    ds = _dataset(SecondaryCaptureImageStorage, "OT", patient_no)
    ds.SeriesInstanceUID = series_uid or f"{UID_ROOT}.2.{patient_no}"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept if intercept is not None else 0
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    stored = pixels.astype(np.uint16 if bits > 8 else np.uint8)
    ds.PixelData = stored.tobytes()
    if syntax != PLAIN:
        ds.compress(syntax, stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_no_pixels(path: Path, patient_no: int = 1) -> Path:
    """A report (Basic Text SR): DICOM, but no image."""
    ds = _dataset(BASIC_TEXT_SR, "SR", patient_no)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def mono1_twin(pixels: np.ndarray, bits: int, center: float, slope: float = 1.0, intercept: float = 0.0):
    """The MONOCHROME1 twin of a MONOCHROME2 image: stored values inverted, window centre mirrored, so that a
    viewer shows both alike. Returns (stored pixels, window centre)."""
    top = 2**bits - 1
    # Modality values v = slope * s + intercept; inverted: v' = slope * (top - s) + intercept = M - v, with
    # M = slope * top + 2 * intercept. LINEAR's output at v' with centre M - c + 1 (its half-level shift, twice)
    # is 255 minus the original's output at v.
    return top - pixels, slope * top + 2 * intercept - center + 1


__all__ = [
    "FRAGMENTS",
    "PLAIN",
    "JPEG2000Lossless",
    "RLELossless",
    "mono1_twin",
    "patient",
    "tag_values",
    "write_dicom",
    "write_no_pixels",
]
