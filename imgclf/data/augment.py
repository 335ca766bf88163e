"""Offline augmentation that keeps the cached-feature speed.

Live random augmentation in front of a frozen backbone would make the backbone run every epoch. Instead each
unique training image gets `augment.copies` variants, made once and passed through the backbone once
(augment@<bb>), then cached like the originals. Variant k of an image is drawn from a generator seeded by
(base.seed, the image's sha256, k), so a rerun gives the same bytes and the same variant whatever split
or order the image comes in. Validation and test images are never augmented.

The transforms are the ones expected for X-ray and MRI work, each with its strength in params.yaml: a
horizontal flip (off for modalities where left and right matter), rotation, zoom, translation, brightness
and contrast. Pixels moved in from outside the image are black (0), the background of most scans.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from imgclf.core.io import save_figure
from imgclf.data.images import DEFAULT_RECIPE, ImageRecipe, load_image


@dataclass(frozen=True)
class AugmentParams:
    copies: int = 0  # variants per unique training image; 0 = off
    flip: bool = True  # horizontal flip with probability 1/2
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    zoom: float = 0.1  # scale uniform in [1 - zoom, 1 + zoom]
    translation: float = 0.1  # shift per axis, uniform in [-translation, translation] x side
    brightness: float = 0.1  # added, uniform in [-brightness, brightness] x 255
    contrast: float = 0.1  # around the image mean, factor uniform in [1 - contrast, 1 + contrast]

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> AugmentParams:
        return cls(**section)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_transform(image: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """One random variant of `image` (S, S, 3) float32 0..255, drawn from `rng`: same rng state, same bytes."""
    # Draw every number, in a fixed order, whatever is switched off: a variant does not depend on other knobs.
    flip = rng.random() < 0.5
    angle = math.radians(rng.uniform(-1.0, 1.0) * params.rotation)
    scale = 1.0 + rng.uniform(-1.0, 1.0) * params.zoom
    shift = rng.uniform(-1.0, 1.0, size=2) * params.translation
    brightness = rng.uniform(-1.0, 1.0) * params.brightness * 255.0
    contrast = 1.0 + rng.uniform(-1.0, 1.0) * params.contrast

    # Brightness and contrast first, so that pixels moved in from outside stay black (0).
    mean = float(image.mean())
    toned = (image.astype(np.float32) - mean) * contrast + mean + brightness
    im = Image.fromarray(np.clip(np.rint(toned), 0, 255).astype(np.uint8))
    if params.flip and flip:
        im = ImageOps.mirror(im)
    w, h = im.size
    cx, cy = w / 2.0, h / 2.0
    tx, ty = shift[0] * w, shift[1] * h
    # Forward: out = scale * R(angle) (in - centre) + centre + shift. PIL wants the inverse, out -> in.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale  # math, not NumPy: the same bits everywhere
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    im = im.transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(im, dtype=np.float32)


def variant_rng(seed: int, sha256: str, k: int) -> np.random.Generator:
    """The generator of variant k (1, 2, ...) of the image with content `sha256`."""
    return np.random.default_rng([seed, int(sha256[:16], 16), k])


def make_variant(image: np.ndarray, seed: int, sha256: str, k: int, params: AugmentParams) -> np.ndarray:
    """Variant k of an image: deterministic in (seed, content, k) and the transform strengths."""
    return random_transform(image, variant_rng(seed, sha256, k), params)


def augment_preview(
    images: pd.DataFrame,
    root: str | Path,
    path: str | Path,
    params: AugmentParams,
    seed: int,
    per_row: int = 4,
    image_size: int = 96,
    recipe: ImageRecipe = DEFAULT_RECIPE,
) -> None:
    """A figure: one image per class (the first kept file by path), then its variants 1, 2, ... made exactly
    as augment@<bb> makes them for a training image (at `image_size`), so that the transforms can be judged
    before paying for them. Drawn from the manifest, so it shows even when the split stops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts = images.sort_values("path").drop_duplicates("label").sort_values("label")
    shown = min(params.copies, per_row) or per_row
    fig, axes = plt.subplots(len(firsts), shown + 1, figsize=(1.6 * (shown + 1), 1.7 * len(firsts)), squeeze=False)
    for r, row in enumerate(firsts.itertuples()):
        image = load_image(Path(root) / row.path, image_size, recipe)
        panels = [("original", image)] + [
            (f"variant {k}", make_variant(image, seed, row.sha256, k, params)) for k in range(1, shown + 1)
        ]
        for c, (name, panel) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel.astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row.label}: {name}" if c == 0 else name, fontsize=8, loc="left")
    note = "" if params.copies else " (augment.copies is 0: a preview, not used in training)"
    fig.suptitle(f"Augmented training variants{note}")
    save_figure(fig, path)
