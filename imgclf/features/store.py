"""Read access to a features directory written by features@<bb>: rows by content hash, read from disk.

Rows are read from disk batch by batch (rows.RowReader), not held in memory or memory-mapped: resident
memory stays a batch whatever the dataset size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from imgclf.core.errors import UserError
from imgclf.core.io import read_csv, read_json
from imgclf.features.backbone_pass import EXTRACTOR_FILE, FEATURES_FILE, INDEX_FILE, INFO_FILE
from imgclf.features.rows import RowReader


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
        self.array = RowReader(self.directory / FEATURES_FILE)  # (N, h, w, C)
        index = read_csv(self.directory / INDEX_FILE)
        self.row_of = dict(zip(index.sha256, index.row, strict=True))
        self.info = read_json(self.directory / INFO_FILE)

    def extractor(self) -> Any:
        from imgclf.features.extractor import load_extractor

        return load_extractor(str(self.directory / EXTRACTOR_FILE))

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
        """Features for each row of `frame`, in order (oversampled rows repeat): (len(frame), h, w, C), in
        memory: for a few rows (attention maps, tests); datasets go through `FeatureBatches`."""
        return self.array[self.rows(frame)]

    def channel_stats(self, frame: pd.DataFrame, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance over the rows of `frame` and all positions, in bounded memory."""
        rows = self.rows(frame)
        c = self.array.shape[-1]
        total, total_sq, count = np.zeros(c), np.zeros(c), 0
        for i in range(0, len(rows), chunk):
            block = self.array[rows[i : i + chunk]].astype(np.float64).reshape(-1, c)
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
        self.array = RowReader(self.directory / FEATURES_FILE)  # (N * copies, h, w, C)
        index = read_csv(self.directory / INDEX_FILE)
        self.row_of = {(s, int(k)): int(r) for s, k, r in zip(index.sha256, index.variant, index.row, strict=True)}

    def rows(self, frame: pd.DataFrame) -> np.ndarray:
        """Row numbers of the `copies` variants of each row of `frame` (row by row, variants 1..copies):
        len(frame) * copies. Oversampled repeats of an image repeat its variants."""
        keys = [(s, k) for s in frame.sha256 for k in range(1, self.copies + 1)]
        missing = [key for key in keys if key not in self.row_of]
        if missing:
            raise UserError(
                f"{len(missing)} augmented variant(s) missing in {self.directory} (e.g. {missing[0]}); "
                f"run `dvc repro augment@{self.directory.name}`"
            )
        return np.array([self.row_of[key] for key in keys], dtype=np.int64)

    def take(self, frame: pd.DataFrame) -> np.ndarray:
        """The variants' features, in memory (see `rows`): (len(frame) * copies, h, w, C)."""
        return self.array[self.rows(frame)]


class FeatureBatches(keras.utils.PyDataset):
    """(features, labels) batches gathered by row number from sources that stay on disk.

    A source is anything that `source[rows]` turns into an array (B, h, w, C): a `store.RowReader` over a
    features.npy, or an in-memory array. The dataset is a list of (source, row, label) items, so oversampled
    repeats and augmented variants are indices, never copies: memory is one batch (and the tf.data prefetch
    of a few), whatever the dataset size. With `shuffle_seed`, the order is a new seeded permutation every
    epoch (the same on every run); without, the items' order (predictions line up with the frame).
    """

    def __init__(
        self,
        parts: list[tuple[Any, np.ndarray, np.ndarray]],
        batch_size: int,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.sources = [source for source, _, _ in parts]
        self.source_of = np.concatenate([np.full(len(rows), i) for i, (_, rows, _) in enumerate(parts)])
        self.rows = np.concatenate([np.asarray(rows, dtype=np.int64) for _, rows, _ in parts])
        self.labels = np.concatenate([np.asarray(labels) for _, _, labels in parts])
        if len(self.rows) != len(self.labels):
            raise ValueError(f"rows and labels differ in length. Received: {len(self.rows)}, {len(self.labels)}")
        self.batch_size = batch_size
        self.shape = tuple(self.sources[0].shape[1:])
        self.rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        self.order = np.arange(len(self.rows))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        items = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = np.empty((len(items), *self.shape), dtype=np.float32)
        for i, source in enumerate(self.sources):
            mine = np.flatnonzero(self.source_of[items] == i)
            if not mine.size:
                continue
            rows = self.rows[items[mine]]
            if isinstance(source, RowReader) and source.dtype == x.dtype:
                source.gather(rows, x, mine)  # straight from the file into the batch
            else:
                x[mine] = source[rows]
        return x, self.labels[items]

    def on_epoch_end(self) -> None:
        if self.rng is not None:
            self.order = self.rng.permutation(len(self.rows))
