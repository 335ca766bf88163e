"""DICOM files as a radiologist's viewer shows them: the one place a DICOM file becomes pixels.

`imgclf.data.images.decode_image` hands every DICOM file here (by extension or by content: the `DICM` marker at
byte 128), so prepare, eda, features@, augment@, fine-tuning, evaluate@, predict and the Ray workers all see
the same pixels. The steps, in the order of the DICOM grayscale pipeline (PS3.4 N.2.1.1):

1. one frame: a multi-frame file gives one image, by default its middle frame (`ImageRecipe.dicom_frame`);
2. modality LUT: RescaleSlope/RescaleIntercept (or a Modality LUT Sequence) to the modality's units (HU for CT);
3. VOI: the file's own window (WindowCenter/WindowWidth with its VOI LUT Function, or a VOI LUT Sequence) onto
   0..255, as a viewer opens the image (`ImageRecipe.dicom_window: file`), or the per-image percentile window
   of `ImageRecipe.window` (`dicom_window: percentile`; also what a file without a window gets, unless it is
   plain 8-bit with no rescale, which shows as stored);
4. MONOCHROME1 (dark means bright) inverted after the window, so it looks like its MONOCHROME2 twin.

Colour files (RGB, YBR_*: pydicom converts to RGB) pass through at 8 bits. A file without pixel data (a report,
a presentation state), a transfer syntax no installed decoder reads, a truncated file and a non-DICOM file named
`.dcm` each raise ImageSkip with their own reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
DICOM_WINDOWS = ("file", "percentile")
FRAME_CHOICES = ("middle", "first", "last")
_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")


_QUIET = False


def _quiet_pydicom() -> None:
    """Keep attribute values out of warnings and logs: pydicom reports a non-conformant value (a UID with a
    leading zero, a malformed date) by quoting it, on stderr and through its logger, where a run log or CI
    output would keep a patient's attribute. Validation on reading is turned off for the process and pydicom's
    logger lowered to errors; decoding is not affected."""
    global _QUIET
    if _QUIET:
        return
    import logging

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    _QUIET = True


def has_dicom_marker(path: str | Path) -> bool:
    """The DICOM Part 10 marker: 128 bytes of preamble, then `DICM`. False for an unreadable or short file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


# Names that are Pillow's formats: not opened twice to look for a DICOM marker (the common case stays one open).
PIL_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_dicom(path: str | Path) -> bool:
    """A `.dcm`/`.dicom` name, or DICOM content under any name but a Pillow format's (PACS exports often have
    no extension, or one like `.1` or `.IMA`)."""
    suffix = Path(path).suffix.lower()
    return suffix in DICOM_EXTENSIONS or (suffix not in PIL_EXTENSIONS and has_dicom_marker(path))


def frame_index(choice: str | int, frames: int) -> int:
    """The 0-based frame that `dicom_frame` picks among `frames`; an integer beyond the last is an ImageSkip."""
    from imgclf.data.images import ImageSkip

    if choice == "first":
        return 0
    if choice == "last":
        return frames - 1
    if choice == "middle":
        return frames // 2
    index = int(choice)
    if not 0 <= index < frames:
        raise ImageSkip(f"DICOM has {frames} frame(s); data.dicom_frame={index} is beyond the last (0-based)")
    return index


def _read(path: str | Path) -> Any:
    """The dataset, or ImageSkip with the reason: not DICOM, truncated, or no pixel data."""
    from imgclf.data.images import ImageSkip

    _quiet_pydicom()
    try:
        with warnings.catch_warnings():  # pydicom warns at a truncated file: the manifest gives the reason
            warnings.simplefilter("ignore")
            ds = _dcmread(path)
    except ImageSkip:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise ImageSkip(f"unreadable ({exc.strerror or exc})") from None
        raise ImageSkip(f"truncated or corrupt DICOM ({exc})") from None
    except Exception as exc:  # pydicom raises many kinds (EOFError, struct.error, ValueError...)
        raise ImageSkip(f"truncated or corrupt DICOM ({type(exc).__name__}: {_short(exc)})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID")
        if sop is None or "Rows" in ds:  # pydicom stops quietly at a cut: an image without its pixels is truncated
            raise ImageSkip("truncated or corrupt DICOM (no SOP class or image attributes without pixel data)")
        raise ImageSkip(f"DICOM without pixel data ({getattr(sop, 'name', '') or sop})")
    return ds


def _dcmread(path: str | Path) -> Any:
    """pydicom's reading of a Part 10 file; a `.dcm`/`.dicom` without the preamble (older exports) is read as a
    bare dataset when it is one (pixel data and image size), its transfer syntax taken from its encoding."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from imgclf.data.images import ImageSkip

    not_dicom = ImageSkip("not a DICOM file (no DICM marker and no DICOM header), whatever the extension")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        if Path(path).suffix.lower() not in DICOM_EXTENSIONS:
            raise not_dicom from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:  # a text file named .dcm, read as a dataset, fails in many ways
        raise not_dicom from None
    if "PixelData" not in ds or "Rows" not in ds:
        raise not_dicom
    ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        uid = pydicom.uid
        syntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax if little else uid.ExplicitVRBigEndian
    return ds


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_dicom(path: str | Path, recipe: Any) -> tuple[Image.Image, str, str]:
    """(RGB 8-bit image, PhotometricInterpretation, frame record) of a DICOM file, by `recipe` (an ImageRecipe).
    The frame record is "" for a single frame, else "<1-based frame> of <frames>" (written to the manifest)."""
    from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array

    from imgclf.data.images import ImageSkip, high_bit_depth_to_8bit

    ds = _read(path)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise ImageSkip("truncated or corrupt DICOM (no Transfer Syntax UID in its file meta)")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageSkip(f"unsupported DICOM transfer syntax ({syntax.name}, {syntax})") from None
    if not decoder.is_available:
        raise ImageSkip(f"unsupported DICOM transfer syntax ({syntax.name}): no installed decoder reads it")
    if int(ds.get("BitsAllocated", 8) or 8) == 1:
        raise ImageSkip("1-bit DICOM (a segmentation or overlay mask), not an image to classify")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONO + _COLOUR:
        raise ImageSkip(f"unsupported DICOM PhotometricInterpretation {photometric or '(none)'}")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageSkip(f"truncated or corrupt DICOM (image size: {_short(exc)})") from None
    if rows * columns > recipe.max_pixels:
        raise ImageSkip(f"decompression bomb: {columns}x{rows} px, more than data.max_pixels={recipe.max_pixels}")
    index = frame_index(recipe.dicom_frame, frames) if frames > 1 else 0  # a single frame is its own choice
    try:
        array = pixel_array(ds, index=index if frames > 1 else None)
    except Exception as exc:  # a decoder's failure on this file's bytes
        raise ImageSkip(f"truncated or corrupt DICOM pixel data ({type(exc).__name__}: {_short(exc)})") from None
    frame = f"{index + 1} of {frames}" if frames > 1 else ""
    if photometric in _COLOUR:
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ImageSkip(f"truncated or corrupt DICOM pixel data (colour frame of shape {array.shape})")
        if array.dtype != np.uint8:
            array = high_bit_depth_to_8bit(array, "bit_depth", bits_stored=int(ds.get("BitsStored", 16)))
        return Image.fromarray(np.ascontiguousarray(array), "RGB"), photometric, frame
    if array.ndim != 2:
        raise ImageSkip(f"truncated or corrupt DICOM pixel data (grayscale frame of shape {array.shape})")
    _frame_attributes(ds, index)
    try:
        values = apply_modality_lut(array, ds)
    except Exception as exc:  # a malformed Modality LUT: the stored values mean nothing without it
        raise ImageSkip(f"corrupt DICOM modality LUT ({type(exc).__name__}: {_short(exc)})") from None
    gray = _voi(values, array, ds, recipe)
    inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:  # MONOCHROME1 files state INVERSE too: one inversion either way
        gray = 255 - gray
    return Image.fromarray(gray, "L").convert("RGB"), photometric, frame


# Enhanced (multi-frame) IODs keep the rescale and the window per frame, or shared, in functional groups.
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def _frame_attributes(ds: Any, index: int) -> None:
    """Copy frame `index`'s rescale and window (its per-frame functional group, else the shared one) to the top
    level, where the modality and VOI steps read them. Classic files have none and are left as they are."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    sources = [per_frame[index] if per_frame and index < len(per_frame) else None, shared[0] if shared else None]
    for sequence, keywords in _FRAME_GROUPS.items():
        for source in sources:
            items = source.get(sequence) if source is not None else None
            if items:
                for keyword in keywords:
                    if keyword in items[0]:
                        setattr(ds, keyword, items[0][keyword].value)
                break


def _first(value: Any) -> float:
    """A DS/IS attribute's first value (WindowCenter may hold several alternative windows)."""
    if isinstance(value, list | tuple) or (hasattr(value, "__len__") and not isinstance(value, str | bytes)):
        value = value[0]
    return float(value)


def window_to_8bit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3: a window (center, width) with its VOI LUT Function onto 0..255 (uint8)."""
    x = np.nan_to_num(values.astype(np.float64, copy=False), nan=-np.inf)  # NaN (no value) shows as black
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"WindowWidth {width} must be > 0 for SIGMOID")
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function in ("LINEAR", "LINEAR_EXACT"):
        if function == "LINEAR":
            if width < 1:
                raise ValueError(f"WindowWidth {width} must be >= 1 for LINEAR")
            center, width = center - 0.5, width - 1.0
        elif width <= 0:
            raise ValueError(f"WindowWidth {width} must be > 0 for LINEAR_EXACT")
        # LINEAR with width 1 is a threshold at the center
        y = np.where(x > center, 255.0, 0.0) if width == 0 else ((x - center) / width + 0.5) * 255.0
    else:
        raise ValueError(f"unsupported VOI LUT Function {function!r}")
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _voi(values: np.ndarray, stored: np.ndarray, ds: Any, recipe: Any) -> np.ndarray:
    """The VOI step onto uint8 0..255 (before any MONOCHROME1 inversion). With dicom_window: file, the file's
    VOI LUT, else its first window; without one, or with a malformed one, a file whose stored values are 8-bit
    with no rescale shows as stored, any other the percentile window (a viewer's automatic window)."""
    from imgclf.data.images import high_bit_depth_to_8bit

    if recipe.dicom_window == "file":
        try:
            lut = ds.get("VOILUTSequence")
            if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
                return _voi_lut(values, lut[0], ds)
            center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
            if center is not None and width is not None and str(center) != "" and str(width) != "":
                function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
                return window_to_8bit(values, _first(center), _first(width), function)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            pass  # malformed window or LUT: the percentile window below
        identity = float(ds.get("RescaleSlope", 1) or 1) == 1 and float(ds.get("RescaleIntercept", 0) or 0) == 0
        if int(ds.get("BitsStored", 16)) <= 8 and identity and "ModalityLUTSequence" not in ds:
            return np.clip(stored, 0, 255).astype(np.uint8)  # 8-bit as stored: a viewer shows it unchanged
    return high_bit_depth_to_8bit(np.asarray(values, dtype=np.float64), "window", recipe.window)


def _voi_lut(values: np.ndarray, item: Any, ds: Any) -> np.ndarray:
    """A VOI LUT Sequence item (PS3.3 C.11.2.1.1) onto 0..255: values below the first mapped one take the first
    entry, above the last the last; the output spans the LUT's nominal bits (the descriptor's third value).
    Indexed in int64 (pydicom 3.0.2's apply_voi indexes in the LUT's own type, which wraps 8-bit LUTs of more
    than 256 entries)."""
    from pydicom.pixels import apply_voi

    descriptor = [int(v) for v in item.LUTDescriptor]
    entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
    if not 8 <= bits <= 16:
        raise ValueError(f"{bits} bits per VOI LUT entry")
    # The LUT's data through pydicom (it reads OW/US and the byte order), on an index ramp 0..entries-1.
    ramp = np.arange(first, first + entries, dtype=np.int64)
    table = apply_voi(ramp, ds).astype(np.float64) if bits > 8 else _lut_8bit(item, entries)
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)
    return np.clip(np.rint(table[index] * (255.0 / (2.0**bits - 1))), 0, 255).astype(np.uint8)


def _lut_8bit(item: Any, entries: int) -> np.ndarray:
    """An 8-bit LUT's entries, read as pydicom 3.0.2's apply_voi reads them: US values, or OW bytes one
    16-bit word per entry (little endian)."""
    data = item.LUTData
    if isinstance(data, bytes):
        table = np.frombuffer(data, dtype="<u2")[:entries]
    else:
        table = np.asarray(data if isinstance(data, list | tuple) else [data])[:entries]
    return table.astype(np.float64)


def read_tag(path: str | Path, keyword: str) -> str:
    """The value of the attribute `keyword` (e.g. PatientID) as text, "" when absent, empty or not DICOM.
    Reads the header only. The value is identifying: callers hash it (imgclf.data.subjects) and never write it."""
    import pydicom

    _quiet_pydicom()
    bare = Path(path).suffix.lower() in DICOM_EXTENSIONS  # a .dcm without the preamble is read, as _dcmread does
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword], force=bare)
            value = ds.get(keyword)
    except Exception:  # not DICOM or unreadable: no key
        return ""
    return "" if value is None else str(value).strip()
