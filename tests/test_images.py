"""Decoding real medical files: high bit depths keep their contrast, and near-copies are found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset, shape_image
from PIL import Image

from imgclf.data.groups import group_confirmed, near_duplicate_pairs
from imgclf.data.images import ImageRecipe, load_image
from imgclf.data.scan import scan_folder
from imgclf.data.split import split_manifest


def twelve_bit_png(path: Path) -> np.ndarray:
    """A 12-bit scan (values 0..4095, as many MRI/CT exports) stored as a 16-bit PNG: a gradient plus a disc."""
    yy, xx = np.mgrid[:64, :64]
    data = (xx * 4095 / 63 * 0.6).astype(np.uint16)
    data[np.hypot(yy - 32, xx - 32) < 12] = 4095
    Image.fromarray(data).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return data


@pytest.mark.parametrize(
    ("rule", "brightest", "span"),
    [("window", 255, 250), ("bit_depth", 255, 250), ("full_range", 16, 16)],
)
def test_a_12_bit_png_keeps_its_contrast(tmp_path: Path, rule: str, brightest: int, span: int) -> None:
    raw = twelve_bit_png(tmp_path / "scan.png")
    image = load_image(tmp_path / "scan.png", 64, ImageRecipe(high_bit_depth=rule))
    assert raw.min() == 0 and raw.max() == 4095
    assert image.max() == brightest and image.max() - image.min() >= span
    # Order is kept: brighter in the scan is never darker on screen.
    flat_raw, flat = raw.ravel(), image[..., 0].ravel()
    order = np.argsort(flat_raw, kind="stable")
    assert np.all(np.diff(flat[order]) >= 0)


def test_window_ignores_a_few_hot_pixels(tmp_path: Path) -> None:
    data = np.tile(np.linspace(1000, 2000, 64).astype(np.uint16), (64, 1))
    data[0, :3] = 65535  # a few saturated pixels would squash everything else with a min-max rule
    Image.fromarray(data).save(tmp_path / "hot.png")
    image = load_image(tmp_path / "hot.png", 64)
    assert image[32].min() <= 2 and image[32].max() >= 253


def test_a_resized_re_encoded_copy_is_a_near_duplicate_and_another_image_is_not(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", {"a": 6, "b": 6}, size=64)
    original = Image.open(root / "a" / "a_000.png").convert("RGB")
    original.resize((48, 48), Image.Resampling.BILINEAR).save(root / "a" / "resized_copy.jpg", quality=85)
    rng = np.random.default_rng(99)
    Image.fromarray(shape_image(0, 64, rng)).save(root / "a" / "another_hbar.png")  # same class, other image
    thumbnails: dict = {}
    manifest = scan_folder(root, thumbnails=thumbnails)
    near = near_duplicate_pairs(manifest, 4, thumbnails, 0.99)
    pairs = near.frame()
    confirmed = pairs[pairs.confirmed]
    found = {frozenset((a, b)) for a, b in zip(confirmed.path_a, confirmed.path_b, strict=True)}
    assert frozenset(("a/a_000.png", "a/resized_copy.jpg")) in found
    assert not any("a/another_hbar.png" in pair for pair in found)  # the paths are class/file

    grouped = group_confirmed(manifest, near).set_index("path")
    assert grouped.loc["a/resized_copy.jpg", "group"] == grouped.loc["a/a_000.png", "group"]
    splits = split_manifest(grouped.reset_index(), val=0.2, test=0.2, seed=0)
    home = {p: name for name, df in splits.items() for p in df.path}
    assert home["a/resized_copy.jpg"] == home["a/a_000.png"]


def test_a_file_that_no_longer_decodes_stops_features_with_one_line(tmp_path: Path) -> None:
    from imgclf.core.errors import UserError
    from imgclf.features.backbone_pass import load_or_stop

    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    with pytest.raises(UserError, match=r"big.png can no longer be read \(decompression bomb"):
        load_or_stop(tmp_path / "big.png", 32, ImageRecipe(max_pixels=100))


def test_large_jpegs_decode_at_reduced_scale_to_nearly_the_same_pixels(tmp_path) -> None:
    """data.jpeg_scaling: a 512 px JPEG for a 224 px model is decoded at 256 px by libjpeg, then resized; the
    result differs from a full decode by a few grey levels at most, on average well under one."""
    from imgclf.data.images import ImageRecipe, decode_image, load_image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    smooth = (127 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0))[..., None] + rng.normal(0, 4, (512, 512, 3))
    path = tmp_path / "scan.jpg"
    Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(path, quality=90)
    scaled, full = ImageRecipe(jpeg_scaling=True), ImageRecipe(jpeg_scaling=False)
    assert decode_image(path, scaled, size=224)[0].size == (256, 256)  # 1/2 scale: the smallest >= 224
    assert decode_image(path, scaled, size=100)[0].size == (128, 128)  # 1/4
    assert decode_image(path, scaled)[0].size == (512, 512)  # no size given (prepare, hashing): full decode
    difference = np.abs(load_image(path, 224, scaled) - load_image(path, 224, full))
    assert difference.mean() < 1.0 and difference.max() < 20
    # A model recorded before the option existed decodes as it was trained: in full.
    assert not ImageRecipe.from_params({"background": [0, 0, 0], "max_pixels": 10**8, "high_bit_depth": "window",
                                        "window": [0.5, 99.5]}).jpeg_scaling  # fmt: skip


@pytest.mark.parametrize(
    ("maximum", "bits_stored", "raw", "expected"),
    [
        (4095, None, 1000, 62),  # a 12-bit image using its full range
        (2000, None, 1000, 62),  # a darker 12-bit image: still 12 bits, so 1000 is still 62 (not 125)
        (1000, 12, 1000, 62),  # darker still, but the dataset is declared 12-bit (data.bits_stored)
        (1023, None, 300, 75),  # 10-bit
        (5000, None, 5000, 78),  # 14-bit: 5000 / 16383
        (255, None, 255, 255),  # 8-bit values in a 16-bit container
    ],
)
def test_bit_depth_scales_by_the_standard_depth_not_the_image_maximum(
    maximum: int, bits_stored: int | None, raw: int, expected: int
) -> None:
    from imgclf.data.images import high_bit_depth_to_8bit

    array = np.array([[0, raw, maximum]], dtype=np.uint16)
    assert high_bit_depth_to_8bit(array, "bit_depth", bits_stored=bits_stored)[0, 1] == expected


def test_a_postscript_file_named_png_is_skipped_without_running_ghostscript(tmp_path: Path) -> None:
    """Only the formats of IMAGE_EXTENSIONS are opened: an EPS payload (Pillow would hand it to Ghostscript)
    or a PPM renamed .png is 'not a decodable image', in prepare and predict alike."""
    from imgclf.data.images import ImageSkip, decode_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\nshowpage\n"
    (tmp_path / "x.png").write_bytes(eps)
    Image.new("RGB", (32, 32)).save(tmp_path / "y.png", format="PPM")
    for name in ("x.png", "y.png"):
        with pytest.raises(ImageSkip, match="not a decodable image"):
            decode_image(tmp_path / name)
    manifest = scan_folder(make_dataset(tmp_path / "d", {"a": 3, "b": 3}))
    assert manifest.status.eq("ok").all()  # the supported formats still open


def test_decoding_leaves_pillows_global_settings_alone(tmp_path: Path, monkeypatch) -> None:
    """The pixel limit is checked on the header, not by setting Image.MAX_IMAGE_PIXELS and the warning filters
    on every call: those are process-wide, and loader threads decode at the same time."""
    import warnings

    from PIL import ImageOps

    from imgclf.data import images
    from imgclf.data.images import ImageSkip, decode_image

    Image.new("L", (40, 40)).save(tmp_path / "small.png")
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    seen = []
    real = ImageOps.exif_transpose

    def spy(im, **kwargs):
        seen.append((Image.MAX_IMAGE_PIXELS, list(warnings.filters)))
        return real(im, **kwargs)

    monkeypatch.setattr(images.ImageOps, "exif_transpose", spy)
    decode_image(tmp_path / "small.png", ImageRecipe(max_pixels=10_000))
    assert seen == [before]  # mid-decode, the globals are what they were
    with pytest.raises(ImageSkip, match=r"decompression bomb: 40x40 px, more than data.max_pixels=1000"):
        decode_image(tmp_path / "small.png", ImageRecipe(max_pixels=1000))


def test_high_bit_depth_conversion_holds_one_float32_copy() -> None:
    """An 89-megapixel 16-bit TIFF passes max_pixels; it must not cost several float64 copies (8 bytes each).
    Measured on a 1024 x 1024 image: peak allocation within 10 bytes per pixel, and the same result as the
    float64 computation within one grey level."""
    import tracemalloc

    from imgclf.data.images import high_bit_depth_to_8bit

    raw = np.random.default_rng(0).integers(0, 4096, (1024, 1024)).astype(np.uint16)
    for rule in ("window", "bit_depth"):
        tracemalloc.start()
        out = high_bit_depth_to_8bit(raw, rule)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 10 * raw.size, f"{rule}: {peak / raw.size:.1f} bytes per pixel"
        values = raw.astype(np.float64)
        if rule == "window":
            low, high = np.percentile(values, (0.5, 99.5))
            reference = np.clip(np.rint((values - low) / (high - low) * 255), 0, 255)
        else:
            reference = np.clip(np.rint(values / 4095 * 255), 0, 255)
        assert np.abs(out.astype(int) - reference).max() <= 1
