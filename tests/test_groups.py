"""Near-duplicate search (multi-index hashing) against all pairs, and the near-copy grouping rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imgclf.data.groups import (
    NearDuplicates,
    group_near_duplicates,
    hamming_pairs,
    hamming_pairs_all,
    hash_bands,
    near_copy_leaders,
    pairs_apart,
)


def flip(hashes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    return hashes ^ (np.uint64(1) << bits.astype(np.uint64))


def adversarial(rng: np.random.Generator, max_distance: int) -> np.ndarray:
    """Clusters of copies with a few bits flipped, many identical hashes (blank images), all-zero and all-one
    hashes, pairs whose differences sit in one band, and pairs exactly at and just past the distance."""
    base = rng.integers(0, 2**64, 60, dtype=np.uint64, endpoint=False)
    clusters = np.repeat(base, 15)
    for _ in range(3):
        clusters = np.where(
            rng.random(len(clusters)) < 0.6, flip(clusters, rng.integers(0, 64, len(clusters))), clusters
        )
    same = np.full(200, 0x0123456789ABCDEF, dtype=np.uint64)
    edges = np.array([0, 2**64 - 1], dtype=np.uint64)
    first, width = hash_bands(max_distance)[-1]
    one_band = flip(np.repeat(base[:5], 1), first + rng.integers(0, width, 5))  # differ in the last band only
    at, past = base[5:10].copy(), base[5:10].copy()
    for bit in range(max_distance):
        at = flip(at, np.full(5, 2 * bit + 1))
    past = flip(at, np.full(5, 63))
    return np.concatenate([clusters, same, edges, base, one_band, at, past, base[5:10], rng.permutation(clusters)])


@pytest.mark.parametrize("max_distance", [0, 1, 2, 4, 7, 10])
def test_multi_index_search_finds_exactly_the_pairs_of_all_pairs(max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    cases = {
        "random": rng.integers(0, 2**64, 3000, dtype=np.uint64, endpoint=False),
        "adversarial": adversarial(rng, max_distance),
        # the low 32 bits all zero: the first bands are one huge bucket
        "low bits equal": adversarial(rng, max_distance) & np.uint64(0xFFFFFFFF00000000),
    }
    for name, hashes in cases.items():
        found = hamming_pairs(hashes, max_distance)
        expected = hamming_pairs_all(hashes, max_distance)
        assert name == "random" or len(expected[0]) > len(hashes) // 4, name  # a search with something to find
        for got, want in zip(found, expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_multi_index_search_on_no_and_one_hash() -> None:
    for hashes in (np.array([], dtype=np.uint64), np.array([7], dtype=np.uint64)):
        assert all(len(part) == 0 for part in hamming_pairs(hashes, 4))


def test_bands_cover_the_64_bits_once() -> None:
    for max_distance in range(0, 12):
        bands = hash_bands(max_distance)
        assert len(bands) == max_distance + 1
        assert [first for first, _ in bands] == list(np.cumsum([0] + [w for _, w in bands[:-1]]))
        assert sum(width for _, width in bands) == 64


def contents_of(hashes: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"a/{i:03d}.png" for i in range(len(hashes))],
            "label": "a",
            "sha256": [f"{9 - i:064d}" for i in range(len(hashes))],  # the later, the smaller
        }
    )


def near_of(hashes: list[int], max_distance: int) -> NearDuplicates:
    values = np.array(hashes, dtype=np.uint64)
    a, b, distance = hamming_pairs(values, max_distance)
    return NearDuplicates(contents_of(hashes), values, a, b, distance, max_distance)


def test_a_chain_of_small_steps_does_not_merge_into_one_group() -> None:
    # 0 -> 1 -> 2 -> 3 -> 4: each step flips 3 new bits, so neighbours are 3 apart and content 3 is 9 from 0
    chain = [0, 0b111, 0b111111, 0b111111111, 0b111111111111]
    near = near_of(chain, 4)
    assert len(near) == 4  # the four steps, no more
    leaders = near_copy_leaders(len(chain), near)
    assert leaders.tolist() == [0, 0, 0, 3, 3]  # 1 and 2 within 8 of 0; 3 is 9 from 0: a group of its own
    # (single linkage, a union of the four pairs, would make all five one group)


def test_copies_of_one_image_share_its_group_whatever_their_order() -> None:
    original = 0xF0F0F0F0F0F0F0F0
    copies = [original ^ (1 << bit) ^ (1 << (bit + 20)) for bit in range(5)]  # each 2 from it, up to 4 apart
    near = near_of([*copies, original], 4)
    leaders = near_copy_leaders(6, near)
    assert len(set(leaders.tolist())) == 1


def test_two_copies_of_a_member_join_its_group_though_they_are_2d_apart() -> None:
    """A copy that sorts first leads; the original joins it; a second copy, d from the original but 2d from the
    first copy, still joins: two copies of a group's first image are not split."""
    near = near_of([0b1111, 0, 0b11110000], 4)  # a/000: copy 1, a/001: the original, a/002: copy 2
    assert near_copy_leaders(3, near).tolist() == [0, 0, 0]


def test_groups_are_the_smallest_sha256_and_exact_copies_follow() -> None:
    hashes = [0, 0b1, 0xFFFF << 40]
    near = near_of(hashes, 4)
    contents = near.contents
    manifest = pd.concat([contents, contents.iloc[[1]].assign(path="b/copy_of_001.png", label="a")])
    manifest = manifest.assign(status="ok", group=manifest.sha256)
    grouped = group_near_duplicates(manifest, near).set_index("path").group
    assert grouped["a/000.png"] == grouped["a/001.png"] == grouped["b/copy_of_001.png"] == contents.sha256[1]
    assert grouped["a/002.png"] == contents.sha256[2]


def test_pairs_stream_to_the_same_csv_as_one_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hashes = np.repeat(rng.integers(0, 2**62, 6, dtype=np.uint64), 4).tolist()
    near = near_of(hashes, 2)
    assert len(near) == 6 * 6  # 4 identical hashes a cluster: 6 pairs each
    near.contents.loc[3, "path"] = 'a/with, a comma "and quotes".png'
    near.write_csv(tmp_path / "chunked.csv", chunk=5)
    near.frame().to_csv(tmp_path / "whole.csv", index=False, lineterminator="\n")
    assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    back = pd.read_csv(tmp_path / "chunked.csv", dtype=str)
    assert list(back.columns) == ["path_a", "path_b", "label_a", "label_b", "distance", "same_label"]


def test_a_copy_of_a_member_far_from_the_first_is_counted_as_a_pair_apart() -> None:
    """0xFF joined 0's group at 2d; its own copy 0xFFF is 3d from 0: a group of its own, and the pair is reported."""
    near = near_of([0, 0xF, 0xFF, 0xFFF], 4)
    assert near_copy_leaders(4, near).tolist() == [0, 0, 0, 3]
    manifest = near.contents.assign(status="ok", group=near.contents.sha256)
    grouped = group_near_duplicates(manifest, near)
    assert pairs_apart(grouped, near) == 1  # (0xFF, 0xFFF): 4 bits apart, in two groups
    assert pairs_apart(manifest, near) == len(near)  # ungrouped: every pair apart
