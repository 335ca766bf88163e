"""Offline augmentation: variants that differ, repeat exactly, and respect the strengths they are given."""

from __future__ import annotations

import numpy as np
from helpers import shape_image

from imgclf.data.augment import AugmentParams, make_variant

SHA = "3f" * 32
IMAGE = np.stack([shape_image(1, 64, np.random.default_rng(0))] * 3, axis=-1).astype(np.float32)  # (64, 64, 3)
DEFAULT = AugmentParams(copies=4)


def test_variants_differ_from_the_original_and_from_each_other() -> None:
    variants = [make_variant(IMAGE, 42, SHA, k, DEFAULT) for k in range(1, 5)]
    for v in variants:
        assert v.shape == IMAGE.shape and v.dtype == np.float32 and v.min() >= 0 and v.max() <= 255
        assert np.abs(v - IMAGE).mean() > 1.0
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(variants[i] - variants[j]).mean() > 1.0


def test_a_variant_is_the_same_bytes_every_time_and_depends_on_seed_content_and_k() -> None:
    first = make_variant(IMAGE, 42, SHA, 1, DEFAULT)
    assert make_variant(IMAGE.copy(), 42, SHA, 1, DEFAULT).tobytes() == first.tobytes()
    assert not np.array_equal(make_variant(IMAGE, 43, SHA, 1, DEFAULT), first)
    assert not np.array_equal(make_variant(IMAGE, 42, "40" * 32, 1, DEFAULT), first)


def test_strengths_zero_leave_the_image_alone_and_flip_only_mirrors() -> None:
    off = AugmentParams(copies=1, flip=False, rotation=0, zoom=0, translation=0, brightness=0, contrast=0)
    for k in range(1, 6):
        np.testing.assert_allclose(make_variant(IMAGE, 42, SHA, k, off), IMAGE, atol=1e-4)
    flip_only = AugmentParams(copies=1, flip=True, rotation=0, zoom=0, translation=0, brightness=0, contrast=0)
    variants = [make_variant(IMAGE, 42, SHA, k, flip_only) for k in range(1, 9)]
    mirrored = [np.allclose(v, IMAGE[:, ::-1], atol=1e-4) for v in variants]
    unchanged = [np.allclose(v, IMAGE, atol=1e-4) for v in variants]
    assert all(m != u for m, u in zip(mirrored, unchanged, strict=True))  # each one or the other, nothing else
    assert any(mirrored) and any(unchanged)


class Draws:
    """A stand-in for the generator: the flip draw, then the uniform draws in random_transform's order
    (angle, zoom, shift x and y, brightness, contrast), each in [-1, 1]."""

    def __init__(self, flip: bool = False, angle=0.0, zoom=0.0, shift=(0.0, 0.0), brightness=0.0, contrast=0.0):
        self.flip = flip
        self.draws = [angle, zoom, np.array(shift), brightness, contrast]

    def random(self) -> float:
        return 0.1 if self.flip else 0.9

    def uniform(self, low, high, size=None):
        return self.draws.pop(0)


STRONG = AugmentParams(copies=1, rotation=90, zoom=0.5, translation=0.25, brightness=0.2, contrast=0.5)


def test_translation_moves_the_image_by_that_fraction_and_fills_with_black() -> None:
    from imgclf.data.augment import random_transform

    out = random_transform(IMAGE, Draws(shift=(1.0, 0.0)), STRONG)  # +0.25 of 64 px = 16 px to the right
    np.testing.assert_allclose(out[:, 16:], IMAGE[:, :-16], atol=1e-4)
    assert out[:, :16].max() == 0


def test_rotation_and_zoom_turn_and_scale_about_the_centre() -> None:
    from imgclf.data.augment import random_transform

    turned = random_transform(IMAGE, Draws(angle=1.0), STRONG)  # 90 degrees
    assert min(np.abs(turned - np.rot90(IMAGE, k)).mean() for k in (1, 3)) < 1.0
    square = np.zeros((64, 64, 3), dtype=np.float32)
    square[24:40, 24:40] = 200.0  # 16 x 16, centred
    zoomed = random_transform(square, Draws(zoom=1.0), STRONG)  # x 1.5
    bright = zoomed[..., 0] > 100
    assert zoomed[32, 32, 0] == 200.0 and abs(bright.sum() / 256 - 2.25) < 0.3
    rows, cols = np.nonzero(bright)
    assert abs(rows.mean() - 31.5) < 0.6 and abs(cols.mean() - 31.5) < 0.6


def test_brightness_and_contrast_leave_the_filled_border_black() -> None:
    from imgclf.data.augment import random_transform

    out = random_transform(IMAGE + 50, Draws(shift=(1.0, 0.0), brightness=1.0, contrast=1.0), STRONG)
    assert out[:, :16].max() == 0 and out[:, 16:].mean() > IMAGE.mean() + 50


def test_variants_line_up_with_their_rows_and_labels(tmp_path) -> None:
    """VariantStore.take gives row j's variants 1..copies in order: train repeats each label `copies` times."""
    import pandas as pd

    from imgclf.core.io import write_csv, write_json
    from imgclf.features.backbone_pass import FEATURES_FILE, INDEX_FILE, INFO_FILE
    from imgclf.features.store import VariantStore

    rows = pd.DataFrame(
        {"sha256": ["b", "b", "a", "a"], "path": ["b.png"] * 2 + ["a.png"] * 2, "variant": [1, 2, 1, 2]}
    )
    np.save(tmp_path / FEATURES_FILE, np.arange(4, dtype="<f4").reshape(4, 1, 1, 1) + 10)  # row i holds 10 + i
    write_csv(rows.assign(row=range(4)), tmp_path / INDEX_FILE)
    write_json(tmp_path / INFO_FILE, {"copies": 2, "augment": {}})
    balanced = pd.DataFrame({"sha256": ["a", "b", "a"], "label": ["x", "y", "x"]})  # "a" oversampled
    taken = VariantStore(tmp_path).take(balanced).ravel().tolist()
    assert taken == [12, 13, 10, 11, 12, 13]  # a1 a2, b1 b2, a1 a2
    labels = np.repeat(balanced.label.to_numpy(), 2).tolist()
    assert labels == ["x", "x", "y", "y", "x", "x"]
