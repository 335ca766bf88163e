"""The backbone pass's building blocks: decode images in batches, run the frozen backbone on them, check values.

With the backbone frozen and no random augmentation before it, every epoch would recompute the same
numbers; so each unique file (by content hash) goes through the backbone exactly once, even when
oversampling repeats it. Memory is bounded by one batch: the next batch is decoded in a background thread
while the backbone runs, and the caller (reuse.compute_features) stores each batch's outputs as they come.

Everything written is a function of the images, the params and the code: no timing, no date (the
stage's log line and the run log carry the timing), so an identical rerun gives identical bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from imgclf.core.errors import UserError
from imgclf.core.io import atomic_path, write_csv, write_json
from imgclf.core.logs import Progress
from imgclf.data.images import DEFAULT_RECIPE, ImageRecipe, try_load_image

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
INFO_FILE = "info.json"
EXTRACTOR_FILE = "extractor.keras"  # the exact backbone that made these features, reused by train
# What the extractor is, and nothing about the images it ran on: augment@ depends on this file and
# extractor.keras only, so adding a test image (a new features@ pass) does not rerun the variants' pass.
EXTRACTOR_INFO_FILE = "extractor.json"
EXTRACTOR_KEYS = ("backbone", "image_size", "preprocessing", "precision", "weights", "weights_sha256")


# (index of the image in the list, image (S, S, 3) 0..255) -> transformed image; used to make augmented variants
Transform = Callable[[int, np.ndarray], np.ndarray]


class Engine(Protocol):
    """Runs a saved extractor elsewhere (engine_ray.RayEngine): called with (extractor file, paths, image size,
    batch size, recipe, description), it yields the outputs batch by batch in row order, each block with the
    machine record (JSON) of whoever computed each row; `machines()` lists the records of where it may run."""

    def __call__(
        self, model_file: Path, paths: list[Path], image_size: int, batch_size: int, recipe: ImageRecipe, desc: str
    ) -> Iterator[tuple[np.ndarray, list[str]]]: ...

    def machines(self) -> list[str]: ...


def load_or_stop(path: Path, image_size: int, recipe: ImageRecipe) -> np.ndarray:
    """load_image, with a file that fails to decode reported in the user's terms (it decoded in prepare)."""
    image, reason = try_load_image(path, image_size, recipe)
    if image is None:
        raise UserError(
            f"{path} can no longer be read ({reason}); it was readable when prepare scanned data.root. "
            "Restore the file, or rerun prepare (`dvc repro -f prepare`) so that it is skipped"
        )
    return image


def batches(
    paths: list[Path],
    image_size: int,
    batch_size: int,
    recipe: ImageRecipe = DEFAULT_RECIPE,
    transform: Transform | None = None,
    threads: int = 1,
) -> Iterator[np.ndarray]:
    """Decoded, resized (and, with `transform`, transformed) image batches (B, S, S, 3) float32 0..255;
    the next batch loads in the background, on `threads` threads (Pillow releases the GIL while decoding)."""

    def load_one(i: int) -> np.ndarray:
        image = load_or_stop(paths[i], image_size, recipe)
        return transform(i, image) if transform is not None else image

    def load(pool: ThreadPoolExecutor, start: int) -> list[Future[np.ndarray]]:
        return [pool.submit(load_one, i) for i in range(start, min(start + batch_size, len(paths)))]

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = load(pool, starts[0]) if starts else []
        for i in range(len(starts)):
            current = pending
            pending = load(pool, starts[i + 1]) if i + 1 < len(starts) else []
            yield np.stack([future.result() for future in current])


def iter_features(
    extractor: Any,
    paths: list[Path],
    image_size: int,
    batch_size: int,
    recipe: ImageRecipe = DEFAULT_RECIPE,
    desc: str = "features",
    transform: Transform | None = None,
    threads: int = 1,
) -> Iterator[np.ndarray]:
    """The extractor's outputs (B, h, w, C) float32 for `paths`, batch by batch, with progress reports."""
    with Progress(len(paths), desc) as progress:
        for batch in batches(paths, image_size, batch_size, recipe, transform, threads):
            features = predict_padded(extractor, batch, batch_size)
            progress.update(len(batch))
            yield features


def predict_padded(model: Any, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's outputs (float32) for a batch, run at the shape (batch_size, ...) whatever the batch's length:
    a short last batch is padded with black images and their outputs dropped. The kernels TensorFlow picks (and
    so the last bits of a float) depend on the batch shape, not on the other images in it, so each image's output
    is the same in any batch (tests/test_incremental.py): what lets a pass reuse earlier outputs (reuse.py)."""
    count = len(batch)
    if count < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), dtype=batch.dtype)])
    return np.asarray(model.predict_on_batch(batch), dtype=np.float32)[:count]


def check_values(desc: str, nonfinite: int, nonzero: int, images: int, precision: str) -> None:
    """Stop before writing features a head cannot learn from: infinities/NaN (float16 overflows above 65504)
    or all zeros (a backbone whose activations underflow its precision, e.g. random-init MobileNet, ~1e-20,
    in float16)."""
    fix = "use bfloat16 (float32's range) or float32 for this backbone (features.precision_overrides)"
    if nonfinite:
        raise UserError(f"{desc}: {nonfinite} feature values are NaN or infinite in {precision}; {fix}")
    if images and not nonzero:
        hint = fix if precision == "float16" else "check features.weights and the images"
        raise UserError(f"{desc}: every feature value is 0 in {precision} (the activations underflow); {hint}")


def write_empty_features(out_dir: str | Path, feature_shape: list[int], info: dict[str, Any]) -> None:
    """A features directory with no rows (features.npy of shape (0, h, w, C)), e.g. augmentation switched off."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / FEATURES_FILE, np.zeros((0, *feature_shape), dtype="<f4"))
        write_csv(pd.DataFrame(columns=["sha256", "path", "variant", "row"]), tmp / INDEX_FILE)
        write_json(tmp / INFO_FILE, {**info, "feature_shape": list(feature_shape), "images": 0})
