"""The one image-decoding function, used by prepare, features, evaluate and predict alike.

`decode_image` fully decodes a file (not trusting its extension) and returns RGB 8-bit, handling the
modes found in real folders: CMYK JPEG, RGBA/LA/palette with transparency (composited on a fixed
background), 16-bit grayscale (scaled to 8 bits, not clipped), EXIF rotation. `load_image` adds the
resize to the model's input size. Problems raise `ImageSkip` with a reason for the manifest.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must be an error, never a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default for Image.MAX_IMAGE_PIXELS


class ImageSkip(Exception):
    """The file cannot be used as an image; str(exc) is the reason recorded in the manifest."""


def decode_image(
    path: str | Path,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, str, str]:
    """Fully decode `path` to an RGB 8-bit image. Returns (image, original mode, file format)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x the limit and raises above 2x: both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode, fmt = im.mode, im.format or ""
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im, background), mode, fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSkip(f"decompression bomb: more pixels than data.max_pixels={max_pixels} ({exc})") from None
    except UnidentifiedImageError:
        raise ImageSkip("not a decodable image (content is not a known image format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageSkip(f"truncated or corrupt image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(im: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert any Pillow mode to RGB 8-bit; transparency is composited on `background`."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and array.max(initial=0) > 255):
            # 16-bit data: map 0..65535 onto 0..255 (scale, never clip).
            array = array.astype(np.float64) / 65535.0 * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def load_image(
    path: str | Path,
    image_size: int,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode and resize to (image_size, image_size, 3) float32 in 0..255: the model's raw input."""
    im, _, _ = decode_image(path, background, max_pixels)
    if im.size != (image_size, image_size):
        # Squash to a square (as Keras' image_dataset_from_directory does); bilinear with antialiasing.
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)  # (S, S, 3)
