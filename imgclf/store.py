"""Read access to a features directory written by features@<bb>: rows by content hash, memory-mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.errors import UserError
from imgclf.features import EXTRACTOR_FILE, FEATURES_FILE, INDEX_FILE, INFO_FILE
from imgclf.io import read_csv, read_json


class FeatureStore:
    """The cached feature maps of one backbone (N, h, w, C), looked up by each image's sha256."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        missing = [n for n in (FEATURES_FILE, INDEX_FILE, INFO_FILE) if not (self.directory / n).is_file()]
        if missing:
            raise UserError(
                f"no cached features in {self.directory} (missing {', '.join(missing)}); "
                f"run `dvc repro features@{self.directory.name}` first"
            )
        self.array = np.load(self.directory / FEATURES_FILE, mmap_mode="r")  # (N, h, w, C)
        index = read_csv(self.directory / INDEX_FILE)
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
            example = frame.path[frame.sha256 == missing[0]].iloc[0]
            raise UserError(
                f"{len(missing)} image(s) have no cached features in {self.directory} (e.g. {example}); "
                f"the features are older than the split: run `dvc repro features@{self.directory.name}`"
            )
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


class VariantStore:
    """The cached features of augmented training variants (augment@<bb>): rows by (sha256, variant k)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not all((self.directory / n).is_file() for n in (FEATURES_FILE, INDEX_FILE, INFO_FILE)):
            raise UserError(
                f"no augmented features in {self.directory}; run `dvc repro augment@{self.directory.name}` first"
            )
        self.info = read_json(self.directory / INFO_FILE)
        self.copies = int(self.info["copies"])
        self.array = np.load(self.directory / FEATURES_FILE, mmap_mode="r")  # (N * copies, h, w, C)
        index = read_csv(self.directory / INDEX_FILE)
        self.row_of = {(s, int(k)): int(r) for s, k, r in zip(index.sha256, index.variant, index.row, strict=True)}

    def take(self, frame: pd.DataFrame) -> np.ndarray:
        """The `copies` variants of each row of `frame` (row by row, variants 1..copies): (len(frame) * copies,
        h, w, C). Oversampled repeats of an image repeat its variants."""
        keys = [(s, k) for s in frame.sha256 for k in range(1, self.copies + 1)]
        missing = [key for key in keys if key not in self.row_of]
        if missing:
            raise UserError(
                f"{len(missing)} augmented variant(s) missing in {self.directory} (e.g. {missing[0]}); "
                f"run `dvc repro augment@{self.directory.name}`"
            )
        return np.asarray(self.array[np.array([self.row_of[key] for key in keys], dtype=np.int64)])
