"""Run the frozen backbone once per unique image and stream the feature maps to disk.

With the backbone frozen and no random augmentation before it, every epoch would recompute the same
numbers; here each unique file (by content hash) goes through the backbone exactly once, even when
oversampling repeats it. Memory is bounded by one batch: features are appended to a .npy file as
they come, and the next batch is decoded in a background thread while the backbone runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from imgclf.images import load_image
from imgclf.io import atomic_path, read_json, write_csv, write_json

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
INFO_FILE = "info.json"
EXTRACTOR_FILE = "extractor.keras"  # the exact backbone that made these features, reused by train


def unique_images(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per unique content (sha256), first path in sorted order: the images to compute."""
    rows = pd.concat([f[["sha256", "path"]] for f in frames], ignore_index=True)
    rows = rows.sort_values(["sha256", "path"]).drop_duplicates("sha256").reset_index(drop=True)
    return rows


def batches(
    paths: list[Path], image_size: int, batch_size: int, background: tuple[int, int, int] = (255, 255, 255)
) -> Iterator[np.ndarray]:
    """Decoded, resized image batches (B, S, S, 3) float32 0..255; the next batch loads in the background."""

    def load(chunk: list[Path]) -> np.ndarray:
        return np.stack([load_image(p, image_size, background) for p in chunk])

    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(load, chunks[i + 1]) if i + 1 < len(chunks) else None
            yield batch


def iter_features(
    extractor: Any,
    paths: list[Path],
    image_size: int,
    batch_size: int,
    background: tuple[int, int, int] = (255, 255, 255),
    desc: str = "features",
) -> Iterator[np.ndarray]:
    """The extractor's outputs (B, h, w, C) float32 for `paths`, batch by batch, with a progress bar."""
    with tqdm(total=len(paths), desc=desc, unit="img", mininterval=2, disable=None) as bar:
        for batch in batches(paths, image_size, batch_size, background):
            features = np.asarray(extractor.predict_on_batch(batch), dtype=np.float32)
            bar.update(len(batch))
            yield features


def compute_features(
    extractor: Any,
    images: pd.DataFrame,
    root: str | Path,
    out_dir: str | Path,
    image_size: int,
    batch_size: int,
    info: dict[str, Any],
    background: tuple[int, int, int] = (255, 255, 255),
) -> dict[str, Any]:
    """Write features.npy (N, h, w, C) float32, index.csv (sha256, path, row), info.json and the
    extractor itself (extractor.keras: the end-to-end model must use the very backbone that made the
    features, which matters with random init) into out_dir.

    The directory appears complete or not at all (built under a temporary name, then moved).
    """
    shape = tuple(int(d) for d in extractor.output.shape[1:])
    paths = [Path(root) / p for p in images.path]
    start = time.perf_counter()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        # A plain .npy written batch by batch: resident memory stays one batch, whatever the dataset size
        # (a writable memmap would keep every written page in the process's resident set).
        with open(tmp / FEATURES_FILE, "wb") as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (len(paths), *shape)}
            np.lib.format.write_array_header_1_0(f, header)
            for features in iter_features(
                extractor, paths, image_size, batch_size, background, info.get("backbone", "")
            ):
                f.write(np.ascontiguousarray(features, dtype="<f4").tobytes())
        seconds = time.perf_counter() - start
        write_csv(images.assign(row=np.arange(len(images))), tmp / INDEX_FILE)
        info = {
            **info,
            "feature_shape": list(shape),
            "images": len(paths),
            "seconds": round(seconds, 2),
            "images_per_second": round(len(paths) / seconds, 2) if seconds > 0 else None,
        }
        write_json(tmp / INFO_FILE, info)
        extractor.save(tmp / EXTRACTOR_FILE)
    return info


class FeatureStore:
    """Read access to a features directory: rows by content hash, memory-mapped."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.array = np.load(self.directory / FEATURES_FILE, mmap_mode="r")  # (N, h, w, C)
        index = pd.read_csv(self.directory / INDEX_FILE, keep_default_na=False)
        self.row_of = dict(zip(index.sha256, index.row, strict=True))
        self.info = read_json(self.directory / INFO_FILE)

    def extractor(self) -> Any:
        from imgclf.model import load_model

        return load_model(str(self.directory / EXTRACTOR_FILE))

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[1:])  # type: ignore[return-value]

    def rows(self, frame: pd.DataFrame) -> np.ndarray:
        missing = sorted(set(frame.sha256) - set(self.row_of))
        if missing:
            raise KeyError(f"{len(missing)} images have no cached features in {self.directory}; rerun features")
        return np.array([self.row_of[h] for h in frame.sha256], dtype=np.int64)

    def take(self, frame: pd.DataFrame) -> np.ndarray:
        """Features for each row of `frame`, in order (oversampled rows repeat): (len(frame), h, w, C)."""
        return np.asarray(self.array[self.rows(frame)])

    def channel_stats(self, frame: pd.DataFrame, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance over the rows of `frame` and all positions, in bounded memory."""
        rows = self.rows(frame)
        c = self.array.shape[-1]
        total, total_sq, count = np.zeros(c), np.zeros(c), 0
        for i in range(0, len(rows), chunk):
            block = np.asarray(self.array[np.sort(rows[i : i + chunk])], dtype=np.float64).reshape(-1, c)
            total += block.sum(axis=0)
            total_sq += (block**2).sum(axis=0)
            count += len(block)
        mean = total / count
        return mean, np.maximum(total_sq / count - mean**2, 0.0)
