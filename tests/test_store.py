"""Training streams its features from disk: rows by index, every item once an epoch, nothing held but a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgclf.features.rows import RowReader
from imgclf.features.store import FeatureBatches


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


@pytest.mark.parametrize("iov_max", [3, 1024])
def test_row_reader_gathers_exactly_numpys_rows_straight_into_the_batch(
    tmp_path: Path, iov_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against NumPy's own indexing of the file, over sorted, shuffled, repeated and sequential requests;
    with iov_max 3, runs longer than the kernel's buffer limit are read in several calls."""
    import imgclf.features.rows as rows_module

    monkeypatch.setattr(rows_module, "IOV_MAX", iov_max)
    rng = np.random.default_rng(1)
    array = rng.normal(size=(300, 2, 2, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", array)
    expected = np.load(tmp_path / "f.npy", mmap_mode="r")
    reader = RowReader(tmp_path / "f.npy")
    requests = [
        np.arange(300),
        np.arange(40, 80)[::-1],
        rng.integers(0, 300, 64),  # shuffled, with repeats
        np.sort(rng.choice(300, 100, replace=False)),
        np.repeat([5, 6, 7], 4),
        np.array([299, 0, 299]),
    ]
    for rows in requests:
        np.testing.assert_array_equal(reader[rows], expected[rows])
        out = np.full((len(rows) + 5, 2, 2, 3), np.nan, dtype=np.float32)
        positions = rng.permutation(len(out))[: len(rows)]
        reader.gather(rows, out, positions)
        np.testing.assert_array_equal(out[positions], expected[rows])
        untouched = np.setdiff1d(np.arange(len(out)), positions)
        assert np.isnan(out[untouched]).all()  # nothing written outside the positions asked for


def test_short_reads_are_continued_until_every_row_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preadv may read less than asked (a cap per call, network filesystems): the reader asks again."""
    import os

    array = np.random.default_rng(2).normal(size=(20, 3, 5)).astype(np.float32)
    np.save(tmp_path / "f.npy", array)
    real = os.preadv
    calls = []

    def stingy(fd: int, buffers: list, offset: int) -> int:  # at most 7 bytes a call, into the first buffer
        calls.append(offset)
        first = buffers[0]
        data = os.pread(fd, min(7, len(first)), offset)
        first[: len(data)] = data
        return len(data)

    monkeypatch.setattr(os, "preadv", stingy)
    rows = np.array([3, 4, 5, 19, 0])
    np.testing.assert_array_equal(RowReader(tmp_path / "f.npy")[rows], array[rows])
    assert len(calls) > 5 * 60 / 7  # many calls, each continuing where the last stopped
    monkeypatch.setattr(os, "preadv", real)
