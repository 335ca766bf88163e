"""Near-duplicate search (multi-index hashing) against all pairs, the confirmation score, and groups as the union
of confirmed pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imgclf.data.groups import (
    NearDuplicates,
    chance_pairs,
    group_confirmed,
    hamming_pairs,
    hamming_pairs_all,
    hash_bands,
    linked_splits,
    pairs_apart,
    thumbnail_correlation,
)
from imgclf.data.split import HELD_OUT, split_manifest


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


def near_of(hashes: list[int], max_distance: int, unconfirmed: tuple[tuple[int, int], ...] = ()) -> NearDuplicates:
    """Candidates of these hashes, every one confirmed (score 1.0) except the (a, b) pairs in `unconfirmed`."""
    values = np.array(hashes, dtype=np.uint64)
    a, b, distance = hamming_pairs(values, max_distance)
    score = np.array([0.5 if (i, j) in unconfirmed else 1.0 for i, j in zip(a.tolist(), b.tolist(), strict=True)])
    return NearDuplicates(contents_of(hashes), values, a, b, distance, score, max_distance, 0.99)


def test_groups_are_the_union_of_confirmed_pairs_only() -> None:
    # 0 - 1 - 2 - 3 - 4: each step 3 new bits; every step confirmed but 2-3: {0, 1, 2} and {3, 4}
    chain = [0, 0b111, 0b111111, 0b111111111, 0b111111111111]
    near = near_of(chain, 4, unconfirmed=((2, 3),))
    assert len(near) == 4 and near.confirmed.tolist() == [True, True, False, True]
    manifest = near.contents.assign(status="ok", group=near.contents.sha256)
    grouped = group_confirmed(manifest, near).group.tolist()
    sha = near.contents.sha256
    assert grouped == [sha[2]] * 3 + [sha[4]] * 2  # each group named by its smallest sha256 (the later, smaller)
    assert pairs_apart(grouped_frame := group_confirmed(manifest, near), near) == 0
    assert pairs_apart(manifest, near) == 3  # ungrouped: every confirmed pair apart, the rejected one not counted
    assert grouped_frame.path.tolist() == manifest.path.tolist()


def test_a_confirmed_chain_wider_than_twice_the_distance_is_one_group() -> None:
    """Union, not a rule anchored on a group's first member: five confirmed steps of 3 bits (12 bits end to end,
    more than 2d = 8) stay one group, so no confirmed pair is cut."""
    chain = [0, 0b111, 0b111111, 0b111111111, 0b111111111111]
    near = near_of(chain, 4)
    manifest = near.contents.assign(status="ok", group=near.contents.sha256)
    grouped = group_confirmed(manifest, near)
    assert grouped.group.nunique() == 1 and pairs_apart(grouped, near) == 0


def chain_manifest(with_val: bool) -> tuple[pd.DataFrame, NearDuplicates]:
    """T (a provided test image), A (training, a confirmed near-copy of T), B (training, confirmed with A only,
    5 bits from T), and other training and test images; with_val: V, a provided validation image, and W
    (training, a confirmed near-copy of V)."""
    hashes = [0, 0b11, 0b11 | 0b111 << 10] + [(i + 1) * 0x0F0F0F0F00000000 for i in range(6)]
    paths = ["Testing/a/t.png", "Training/a/a.png", "Training/a/b.png"] + [f"Training/a/x{i}.png" for i in range(4)]
    paths += ["Testing/a/y.png", "Testing/a/z.png"]
    if with_val:
        hashes += [0xFF << 40, 0xFF << 40 | 0b1]
        paths += ["Validation/a/v.png", "Training/a/w.png"]
    near = near_of(hashes, 4)
    contents = near.contents.assign(path=paths)
    near.contents = contents
    provided = [p.split("/")[0].lower().replace("testing", "test").replace("training", "train") for p in paths]
    manifest = contents.assign(
        status="ok", group=contents.sha256, provided_split=[p.replace("validation", "val") for p in provided]
    )
    manifest = group_confirmed(manifest, near)
    return manifest.assign(linked_to=linked_splits(manifest, near, None)), near


@pytest.mark.parametrize("with_val", [False, True])
def test_held_out_is_decided_pair_by_pair_and_no_confirmed_pair_crosses(with_val: bool) -> None:
    manifest, near = chain_manifest(with_val)
    assert manifest.group.iloc[0] == manifest.group.iloc[1] == manifest.group.iloc[2]  # T, A, B: one group
    splits = split_manifest(manifest, val=0.25, test=0.25, seed=0)
    home = {p: name for name, frame in splits.items() for p in frame.path}
    home = {p: home.get(p, HELD_OUT) for p in manifest.path}
    assert home["Testing/a/t.png"] == "test" and home["Training/a/a.png"] == HELD_OUT
    assert home["Training/a/b.png"] in ("train", "val")  # a look-alike of a look-alike: not held out
    if with_val:
        assert home["Validation/a/v.png"] == "val" and home["Training/a/w.png"] == HELD_OUT
    frame = near.frame()
    for a, b in zip(frame.path_a[frame.confirmed], frame.path_b[frame.confirmed], strict=True):
        assert HELD_OUT in (home[a], home[b]) or home[a] == home[b]
    # Without the links (whole groups, the rule before pairs): B would be held out too.
    whole = split_manifest(manifest.drop(columns=["linked_to"]), val=0.25, test=0.25, seed=0)
    assert "Training/a/b.png" not in set().union(*(set(f.path) for f in whole.values()))


def test_groups_do_not_depend_on_names_or_order() -> None:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**64, 40, dtype=np.uint64, endpoint=False)
    hashes = np.concatenate([base, base ^ np.uint64(0b101), base[:10] ^ np.uint64(0b11 << 30)]).tolist()
    reference = None
    for trial in range(6):
        order = rng.permutation(len(hashes)) if trial else np.arange(len(hashes))
        shuffled = [hashes[i] for i in order]
        near = near_of(shuffled, 4)
        contents = near.contents.assign(sha256=[f"{i:064d}" for i in order])  # content follows the image
        near.contents = contents
        grouped = group_confirmed(contents.assign(status="ok", group=contents.sha256), near)
        groups = frozenset(frozenset(g.sha256) for _, g in grouped.groupby("group"))
        reference = reference or groups
        assert groups == reference
    assert max(len(g) for g in reference) == 3  # base, its copy and the second copy of the first ten


def test_exact_copies_follow_their_content_into_its_group() -> None:
    hashes = [0, 0b1, 0xFFFF << 40]
    near = near_of(hashes, 4)
    contents = near.contents
    manifest = pd.concat([contents, contents.iloc[[1]].assign(path="b/copy_of_001.png", label="a")])
    manifest = manifest.assign(status="ok", group=manifest.sha256)
    grouped = group_confirmed(manifest, near).set_index("path").group
    assert grouped["a/000.png"] == grouped["a/001.png"] == grouped["b/copy_of_001.png"] == contents.sha256[1]
    assert grouped["a/002.png"] == contents.sha256[2]


def test_the_score_is_the_exact_pearson_correlation_and_ignores_brightness_and_contrast() -> None:
    rng = np.random.default_rng(1)
    thumbs = rng.integers(0, 256, (6, 32, 32)).astype(np.uint8)
    thumbs[1] = np.clip(thumbs[0].astype(int) // 2 + 40, 0, 255)  # darker, less contrast: a linear change
    thumbs[3] = 7  # flat
    thumbs[4] = 7  # flat, the same value
    thumbs[5] = 9  # flat, another value
    a, b = np.array([0, 0, 0, 3, 3, 2]), np.array([1, 2, 3, 4, 5, 2])
    score = thumbnail_correlation(thumbs, a, b, chunk=4)
    assert score[0] == pytest.approx(np.corrcoef(thumbs[0].ravel(), thumbs[1].ravel())[0, 1], abs=1e-12)
    assert score[0] > 0.999
    assert score[1] == pytest.approx(np.corrcoef(thumbs[0].ravel(), thumbs[2].ravel())[0, 1], abs=1e-12)
    assert abs(score[1]) < 0.1  # unrelated noise
    assert score[2:5].tolist() == [0.0, 1.0, 0.0]  # one flat; both flat and equal; both flat, not equal
    assert score[5] == pytest.approx(1.0)


def test_chance_counts_what_random_pairs_give() -> None:
    rng = np.random.default_rng(2)
    independent = rng.integers(0, 2**64, 20_000, dtype=np.uint64, endpoint=False)
    assert chance_pairs(independent, 4) < 1  # 64 independent bits: about 4e-14 of 2e8 pairs
    alike = independent & np.uint64(0xFF)  # 8 free bits: most pairs within 4
    share = sum(__import__("math").comb(8, k) for k in range(5)) / 256
    n = len(alike)
    assert chance_pairs(alike, 4) == pytest.approx(share * n * (n - 1) / 2, rel=0.02)


def test_links_to_provided_folders_are_by_pair_and_by_subject() -> None:
    # test image T (0); training A (1) a confirmed near-copy of T; B (2) confirmed with A only; C (3) a byte copy
    # of T in training; D (4) rejected candidate of T; V (5) validation; E (6) same subject as V
    hashes = [0, 0b11, 0b11 | 0b111 << 10, 0xFF << 50, 0b111 << 8, 0xF0F0 << 20, 0xFF << 30]
    near = near_of(hashes, 4, unconfirmed=((0, 4),))
    contents = near.contents
    manifest = pd.concat([contents, contents.iloc[[0]].assign(path="a/copy_of_T.png")]).reset_index(drop=True)
    manifest = manifest.assign(status="ok", provided_split=["test", "", "", "", "", "val", "", ""])
    subjects = pd.Series({5: "s1", 6: "s1"})
    linked = linked_splits(manifest, near, subjects)
    assert linked.tolist() == ["test", "test", "", "", "", "val", "val", "test"]
    assert linked_splits(manifest, None, None).tolist() == ["test", "", "", "", "", "val", "", "test"]


def test_pairs_stream_to_the_same_csv_as_one_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hashes = np.repeat(rng.integers(0, 2**62, 6, dtype=np.uint64), 4).tolist()
    near = near_of(hashes, 2)
    assert len(near) == 6 * 6  # 4 identical hashes a cluster: 6 pairs each
    near.contents.loc[3, "path"] = 'a/with, a comma "and quotes".png'
    near.score = np.linspace(0.9, 1.0, len(near))
    near.write_csv(tmp_path / "chunked.csv", chunk=5)
    near.frame().to_csv(tmp_path / "whole.csv", index=False, lineterminator="\n", float_format="%.6f")
    assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    back = pd.read_csv(tmp_path / "chunked.csv", dtype=str)
    assert list(back.columns) == [
        "path_a", "path_b", "label_a", "label_b", "distance", "score", "confirmed", "same_label"
    ]  # fmt: skip
    assert back.confirmed.tolist() == [str(s >= 0.99) for s in near.score]
