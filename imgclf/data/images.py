"""The one image-decoding function, used by prepare, features, fine-tuning, evaluate and predict alike.

`decode_image` fully decodes a file (not trusting its extension) and returns RGB 8-bit, handling the
modes found in real folders: CMYK JPEG, RGBA/LA/palette with transparency (composited on a fixed
background), high bit depths (16-bit PNG/TIFF, 32-bit integer or float: mapped onto 0-255 by
`ImageRecipe.high_bit_depth`), EXIF rotation. `load_image` adds the resize to the model's input size.
Problems raise `ImageSkip` with a reason for the manifest.

The `ImageRecipe` (background, pixel limit, high-bit-depth rule) comes from params.yaml's `data` section,
is recorded in the features' and the model's info.json, and is read back by predict: an image is
prepared the same way in every stage and at prediction time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must be an error, never a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Read by extension; any other file is read when its content is DICOM (is_image_file).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom"})
DEFAULT_BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default for Image.MAX_IMAGE_PIXELS
HIGH_BIT_DEPTH_RULES = ("window", "bit_depth", "full_range")
# The Pillow formats opened (those of IMAGE_EXTENSIONS; MPO, a multi-picture JPEG, comes through JPEG's opener).
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Between Pillow's default limit and data.max_pixels Pillow only warns; our own check (decode_image) decides.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageRecipe:
    """How a file becomes RGB 8-bit: the same in every stage and in predict (recorded in info.json).

    high_bit_depth, for images with more than 8 bits per sample (16-bit PNG/TIFF, 32-bit integer, float):
      window      per image, the `window` percentiles of its values map onto 0..255 (clipped outside), as
                  a radiology viewer's automatic window does; full contrast whatever bits the scanner used
      bit_depth   scale by the bit depth of the acquisition: `bits_stored` when set (one depth for the whole
                  dataset, e.g. 12 for a 12-bit CT series), else the smallest of 8/10/12/14/16 bits that holds
                  the image's maximum. Raw 1000 in a 12-bit image maps to 62 whether its maximum is 4095 or
                  2000; images of one depth keep their relative levels
      full_range  scale by the container's range (0..65535 for 16-bit): a 12-bit scan ends up at 0..16
    """

    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    max_pixels: int = DEFAULT_MAX_PIXELS
    high_bit_depth: str = "window"
    window: tuple[float, float] = (0.5, 99.5)
    # JPEGs at least twice the model's input size are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (its DCT
    # scaling, Pillow's `draft`) before the resize: 2x faster on 512 px files, pixels within a few levels of a
    # full decode. False for models recorded before this existed (their info.json has no such key).
    jpeg_scaling: bool = False
    # bit_depth's scale for every image of the dataset (9..16); None: each image's smallest standard depth.
    bits_stored: int | None = None
    # DICOM (imgclf/data/dicom.py): the file's own window (file) or the percentile `window` (percentile), and
    # which frame of a multi-frame file (middle | first | last | a 0-based index).
    dicom_window: str = "file"
    dicom_frame: str | int = "middle"

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> ImageRecipe:
        """From params.yaml's `data` section (or an info.json record of one)."""
        return cls(
            background=tuple(data["background"]),  # type: ignore[arg-type]
            max_pixels=int(data["max_pixels"]),
            high_bit_depth=data["high_bit_depth"],
            window=tuple(data["window"]),  # type: ignore[arg-type]
            jpeg_scaling=bool(data.get("jpeg_scaling", False)),
            bits_stored=data.get("bits_stored"),
            dicom_window=data.get("dicom_window", "file"),
            dicom_frame=data.get("dicom_frame", "middle"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


DEFAULT_RECIPE = ImageRecipe()


def is_image_file(path: str | Path) -> bool:
    """An image extension (IMAGE_EXTENSIONS), or DICOM content whatever the name (the DICM marker at byte 128)."""
    from imgclf.data.dicom import has_dicom_marker

    return Path(path).suffix.lower() in IMAGE_EXTENSIONS or has_dicom_marker(path)


class ImageSkip(Exception):
    """The file cannot be used as an image; str(exc) is the reason recorded in the manifest."""


def decode_image(
    path: str | Path, recipe: ImageRecipe = DEFAULT_RECIPE, size: int | None = None
) -> tuple[Image.Image, str, str]:
    """Fully decode `path` to an RGB 8-bit image. Returns (image, original mode, file format). With `size` (the
    side the image will be resized to) and `recipe.jpeg_scaling`, a large JPEG is decoded at a reduced scale
    no smaller than `size`.

    Only the formats of IMAGE_EXTENSIONS are opened, whatever the file's name: a PostScript file named `x.png`
    is not handed to Ghostscript. DICOM files (by extension or content: imgclf.data.dicom.is_dicom) are decoded by
    imgclf.data.dicom, the mode being their PhotometricInterpretation and the format "DICOM"; a multi-frame
    file's chosen frame is in the image's info["frame"] ("13 of 25"). The pixel limit is checked on the
    header's size before anything is decoded, without touching Pillow's global settings (safe with several
    loader threads)."""
    max_pixels = recipe.max_pixels
    from imgclf.data.dicom import decode_dicom, is_dicom

    if is_dicom(path):
        im, mode, frame = decode_dicom(path, recipe)
        if frame:
            im.info["frame"] = frame
        return im, mode, "DICOM"
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ImageSkip(
                    f"decompression bomb: {im.width}x{im.height} px, more than data.max_pixels={max_pixels}"
                )
            mode, fmt = im.mode, im.format or ""
            if size and recipe.jpeg_scaling and fmt in ("JPEG", "MPO"):
                im.draft(im.mode, (size, size))  # keeps the mode; the scale keeps both sides >= size
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im, recipe), mode, fmt
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit (2x its default), whatever ours is
        raise ImageSkip(f"decompression bomb: more pixels than Pillow decodes ({exc})") from None
    except UnidentifiedImageError:
        raise ImageSkip(
            f"not a decodable image (content is none of {', '.join(PIL_FORMATS)}, whatever the extension)"
        ) from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error (EIO, EACCES, ENOENT...), not the image's content
            raise ImageSkip(f"unreadable ({exc.strerror or exc})") from None
        raise ImageSkip(f"truncated or corrupt image ({exc})") from None
    except (SyntaxError, ValueError) as exc:
        raise ImageSkip(f"truncated or corrupt image ({exc})") from None


STANDARD_BITS = (8, 10, 12, 14, 16)


def stored_bits(maximum: float, bits_stored: int | None = None) -> int:
    """The acquisition's bit depth: `bits_stored` when known, else the smallest standard depth holding `maximum`
    (above 16 bits: the smallest power of two that holds it)."""
    if bits_stored:
        return int(bits_stored)
    for bits in STANDARD_BITS:
        if maximum <= 2**bits - 1:
            return bits
    return max(17, math.ceil(math.log2(maximum + 1)))


def high_bit_depth_to_8bit(
    array: np.ndarray, rule: str, window: tuple[float, float] = (0.5, 99.5), bits_stored: int | None = None
) -> np.ndarray:
    """Map samples of more than 8 bits onto uint8 0..255 by `rule` (see ImageRecipe); never wraps around.

    Only finite values set the scale: NaN (e.g. the background of a registered scan) and -inf become 0,
    +inf becomes 255. Float images whose values lie in 0..1 are taken as 0..1 intensities.
    Memory: one float32 working copy, scaled in place (4 bytes per pixel, plus the percentile's copy)."""
    # (H, W): the one working copy. float32 holds 16-bit values exactly; wider integers and float64 keep float64
    # (a 32-bit window 2,000,000,000..2,000,000,199 would otherwise collapse to a few grey levels).
    values = array.astype(np.float32 if array.dtype.itemsize <= 2 or array.dtype == np.float32 else np.float64)
    integer = array.dtype.kind in "iu"
    finite = values if integer else values[np.isfinite(values)]  # integers are all finite: no copy
    if finite.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    if rule == "window":
        low, high = (float(x) for x in np.percentile(finite, window))
        if high <= low:  # (nearly) constant image: fall back to its own range
            low, high = float(finite.min()), float(finite.max())
        span = high - low if high > low else 1.0
        values -= low
        values *= 255.0 / span
    elif rule in ("bit_depth", "full_range"):
        lowest, highest = float(finite.min()), float(finite.max())
        if not integer and lowest >= 0 and highest <= 1:
            top = 1.0
        elif rule == "bit_depth":
            top = 2.0 ** stored_bits(max(highest, 0.0), bits_stored) - 1
        else:  # the container: 16-bit unless the values need more
            top = 65535.0 if lowest >= 0 and highest <= 65535 else 2.0**32 - 1
        np.maximum(values, 0.0, out=values)  # negative values (signed data) show as black
        values *= 255.0 / top
    else:
        raise ValueError(f"high_bit_depth must be one of {', '.join(HIGH_BIT_DEPTH_RULES)}. Received: {rule!r}")
    if not integer:
        values[np.isnan(values)] = 0.0
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)  # +inf -> 255, -inf -> 0
    return values.astype(np.uint8)


def to_rgb(im: Image.Image, recipe: ImageRecipe = DEFAULT_RECIPE) -> Image.Image:
    """Convert any Pillow mode to RGB 8-bit; transparency is composited on the recipe's background."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(im)
        if im.mode.startswith("I;16"):
            array = array.astype(np.uint16, copy=False)
        rgb = high_bit_depth_to_8bit(array, recipe.high_bit_depth, recipe.window, recipe.bits_stored)
        return Image.fromarray(rgb).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*recipe.background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def try_load_image(
    path: str | Path, image_size: int, recipe: ImageRecipe = DEFAULT_RECIPE
) -> tuple[np.ndarray | None, str]:
    """(load_image's array, "") or (None, why the file cannot be used): the one place a failed decode becomes a
    reason. Stages turn it into a stop (features/backbone_pass.py: load_or_stop), predict into an error row."""
    try:
        return load_image(path, image_size, recipe), ""
    except ImageSkip as exc:  # decode_image reports file-system errors as "unreadable (...)" too
        return None, str(exc)


def load_image(path: str | Path, image_size: int, recipe: ImageRecipe = DEFAULT_RECIPE) -> np.ndarray:
    """Decode and resize to (image_size, image_size, 3) float32 in 0..255: the model's raw input."""
    im, _, _ = decode_image(path, recipe, size=image_size)
    if im.size != (image_size, image_size):
        # Squash to a square (as Keras' image_dataset_from_directory does); bilinear with antialiasing.
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)  # (S, S, 3)
