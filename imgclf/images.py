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

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default for Image.MAX_IMAGE_PIXELS
HIGH_BIT_DEPTH_RULES = ("window", "bit_depth", "full_range")


@dataclass(frozen=True)
class ImageRecipe:
    """How a file becomes RGB 8-bit: the same in every stage and in predict (recorded in info.json).

    high_bit_depth, for images with more than 8 bits per sample (16-bit PNG/TIFF, 32-bit integer, float):
      window      per image, the `window` percentiles of its values map onto 0..255 (clipped outside), as
                  a radiology viewer's automatic window does; full contrast whatever bits the scanner used
      bit_depth   scale by the bit depth the image actually uses (its maximum rounded up to 2^b - 1, b >= 8):
                  a 12-bit scan 0..4095 maps onto 0..255; images of one bit depth keep their relative levels
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

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> ImageRecipe:
        """From params.yaml's `data` section (or an info.json record of one)."""
        return cls(
            background=tuple(data["background"]),  # type: ignore[arg-type]
            max_pixels=int(data["max_pixels"]),
            high_bit_depth=data["high_bit_depth"],
            window=tuple(data["window"]),  # type: ignore[arg-type]
            jpeg_scaling=bool(data.get("jpeg_scaling", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


DEFAULT_RECIPE = ImageRecipe()


class ImageSkip(Exception):
    """The file cannot be used as an image; str(exc) is the reason recorded in the manifest."""


def decode_image(
    path: str | Path, recipe: ImageRecipe = DEFAULT_RECIPE, size: int | None = None
) -> tuple[Image.Image, str, str]:
    """Fully decode `path` to an RGB 8-bit image. Returns (image, original mode, file format). With `size` (the
    side the image will be resized to) and `recipe.jpeg_scaling`, a large JPEG is decoded at a reduced scale
    no smaller than `size`."""
    max_pixels = recipe.max_pixels
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x the limit and raises above 2x: both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode, fmt = im.mode, im.format or ""
                if size and recipe.jpeg_scaling and fmt == "JPEG":
                    im.draft(im.mode, (size, size))  # keeps the mode; the scale keeps both sides >= size
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im, recipe), mode, fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSkip(f"decompression bomb: more pixels than data.max_pixels={max_pixels} ({exc})") from None
    except UnidentifiedImageError:
        raise ImageSkip("not a decodable image (content is not a known image format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageSkip(f"truncated or corrupt image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def high_bit_depth_to_8bit(array: np.ndarray, rule: str, window: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Map samples of more than 8 bits onto uint8 0..255 by `rule` (see ImageRecipe); never wraps around.

    Only finite values set the scale: NaN (e.g. the background of a registered scan) and -inf become 0,
    +inf becomes 255. Float images whose values lie in 0..1 are taken as 0..1 intensities."""
    values = array.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    if rule == "window":
        low, high = np.percentile(finite, window)
        if high <= low:  # (nearly) constant image: fall back to its own range
            low, high = finite.min(), finite.max()
        span = high - low if high > low else 1.0
        scaled = (values - low) / span * 255.0
    elif rule in ("bit_depth", "full_range"):
        if array.dtype.kind == "f" and finite.min() >= 0 and finite.max() <= 1:
            top = 1.0
        elif rule == "bit_depth":
            top = 2.0 ** max(8, math.ceil(math.log2(max(finite.max(), 0.0) + 1))) - 1
        else:  # the container: 16-bit unless the values need more
            top = 65535.0 if finite.min() >= 0 and finite.max() <= 65535 else 2.0**32 - 1
        scaled = np.maximum(values, 0.0) / top * 255.0  # negative values (signed data) show as black
    else:
        raise ValueError(f"high_bit_depth must be one of {', '.join(HIGH_BIT_DEPTH_RULES)}. Received: {rule!r}")
    scaled = np.where(np.isnan(values), 0.0, scaled)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)  # +inf -> 255, -inf -> 0


def to_rgb(im: Image.Image, recipe: ImageRecipe = DEFAULT_RECIPE) -> Image.Image:
    """Convert any Pillow mode to RGB 8-bit; transparency is composited on the recipe's background."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(im)
        if im.mode.startswith("I;16"):
            array = array.astype(np.uint16)
        return Image.fromarray(high_bit_depth_to_8bit(array, recipe.high_bit_depth, recipe.window)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*recipe.background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def load_image(path: str | Path, image_size: int, recipe: ImageRecipe = DEFAULT_RECIPE) -> np.ndarray:
    """Decode and resize to (image_size, image_size, 3) float32 in 0..255: the model's raw input."""
    im, _, _ = decode_image(path, recipe, size=image_size)
    if im.size != (image_size, image_size):
        # Squash to a square (as Keras' image_dataset_from_directory does); bilinear with antialiasing.
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)  # (S, S, 3)
