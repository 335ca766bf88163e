"""Training streams its features from disk: rows by index, every item once an epoch, nothing held but a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgclf.features.store import FeatureBatches, RowReader


def test_row_reader_returns_the_rows_asked_for_in_any_order_with_repeats(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(50, 2, 3, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", array)
    reader = RowReader(tmp_path / "f.npy")
    assert reader.shape == (50, 2, 3, 4) and len(reader) == 50
    for rows in ([7, 3, 3, 49, 0, 8, 9, 10], list(range(50)), [], [12]):
        np.testing.assert_array_equal(reader[np.array(rows, dtype=np.int64)], array[rows])
    with pytest.raises(IndexError):
        reader[np.array([50])]


def test_a_truncated_feature_file_is_an_error_not_garbage(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.ones((10, 4), dtype=np.float32))
    data = (tmp_path / "f.npy").read_bytes()
    (tmp_path / "f.npy").write_bytes(data[:-8])
    with pytest.raises(OSError, match="shorter than its header"):
        RowReader(tmp_path / "f.npy")[np.array([9])]


def test_feature_batches_serve_every_item_once_per_epoch_in_a_new_seeded_order(tmp_path: Path) -> None:
    """Originals from one file and variants from another, oversampled rows repeated by index."""
    originals = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1)  # feature value = row number
    variants = 100 + np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
    np.save(tmp_path / "o.npy", originals)
    np.save(tmp_path / "v.npy", variants)
    parts = [
        (RowReader(tmp_path / "o.npy"), np.array([0, 1, 2, 2, 5]), np.array([0, 0, 1, 1, 2])),  # row 2 oversampled
        (RowReader(tmp_path / "v.npy"), np.array([3, 0]), np.array([2, 0])),
    ]
    expected = sorted([(0.0, 0), (1.0, 0), (2.0, 1), (2.0, 1), (5.0, 2), (103.0, 2), (100.0, 0)])

    def epoch(batches: FeatureBatches) -> list[tuple[float, int]]:
        items = []
        for i in range(len(batches)):
            x, y = batches[i]
            assert x.dtype == np.float32 and len(x) <= 3
            items += [(float(v), int(label)) for v, label in zip(x.ravel(), y, strict=True)]
        batches.on_epoch_end()
        return items

    batches = FeatureBatches(parts, batch_size=3, shuffle_seed=7)
    assert len(batches) == 3
    first, second = epoch(batches), epoch(batches)
    assert sorted(first) == sorted(second) == expected  # every item once, labels travel with their rows
    assert first != second  # reshuffled
    assert epoch(FeatureBatches(parts, batch_size=3, shuffle_seed=7)) == first  # the same on every run
    in_order = epoch(FeatureBatches(parts, batch_size=3))
    assert [v for v, _ in in_order] == [0.0, 1.0, 2.0, 2.0, 5.0, 103.0, 100.0]  # unshuffled: the parts' order
