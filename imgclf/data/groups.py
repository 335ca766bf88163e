"""Which images belong together: identical content under two labels (label conflicts), and near-copies
(re-encoded, resized) found by perceptual hash and joined into groups that split keeps in one split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.core.io import atomic_path

NEAR_DUPLICATE_COLUMNS = ["path_a", "path_b", "label_a", "label_b", "distance", "same_label"]


def resolve_conflicts(manifest: pd.DataFrame, rule: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply the label-conflict rule to kept rows whose content (sha256) appears under several labels.

    skip: every copy is skipped. majority: copies under the most frequent label are kept, the others
    skipped; a tie skips all. Returns the updated manifest and a report (one row per conflicting file).
    """
    manifest = manifest.copy()
    ok = manifest[manifest.status == "ok"]
    labels_per_hash = ok.groupby("sha256")["label"].nunique()
    conflicted = labels_per_hash[labels_per_hash > 1].index
    report_rows = []
    for digest in sorted(conflicted):
        group = ok[ok.sha256 == digest]
        counts = Counter(group.label)
        ranked = counts.most_common()
        winner = ranked[0][0] if rule == "majority" and ranked[0][1] > ranked[1][1] else None
        for idx, row in group.iterrows():
            keep = row.label == winner
            if not keep:
                manifest.loc[idx, "status"] = "skipped"
                manifest.loc[idx, "reason"] = (
                    f"label conflict: same content under {', '.join(sorted(counts))} (data.label_conflicts={rule})"
                )
            report_rows.append(
                {
                    "sha256": digest,
                    "path": row.path,
                    "label": row.label,
                    "labels": ";".join(sorted(counts)),
                    "kept": keep,
                }
            )
    report = pd.DataFrame(report_rows, columns=["sha256", "path", "label", "labels", "kept"])
    return manifest, report


def perceptual_hash(im: Any) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits: survives re-encoding and resizing."""
    import imagehash

    return str(imagehash.phash(im))


def hash_bands(max_distance: int) -> list[tuple[int, int]]:
    """The 64 bits cut into max_distance + 1 bands (first bit, width), as equal as they come: two hashes at
    most max_distance bits apart are equal on at least one band (pigeonhole), so looking within buckets of
    equal band values finds every such pair."""
    count = max_distance + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    return [(sum(widths[:i]), width) for i, width in enumerate(widths)]


def hamming_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j of 64-bit hashes at most `max_distance` bits apart, exactly: (i, j, distance) as three
    arrays sorted by (i, j). Multi-index hashing: for each of max_distance + 1 bands, sort by the band and
    compare only hashes in one bucket (equal band); a pair is kept in the first band it is equal on, so it
    appears once. Work is the number of same-bucket pairs (about n^2 / 2^13 per band at 64 bits and distance
    4, against n^2 / 2 for all pairs); memory is a few arrays of n, plus 17 bytes per pair found."""
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance must be 0..63. Received: {max_distance}")
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    index = np.int32 if n < 2**31 - 1 else np.int64
    keys = [(hashes >> np.uint64(first)) & np.uint64((1 << width) - 1) for first, width in hash_bands(max_distance)]
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for band, key in enumerate(keys):
        order = np.argsort(key, kind="stable").astype(index)
        sorted_keys, sorted_hashes = key[order], hashes[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        end = np.repeat(starts + sizes, sizes).astype(index)  # one past the last position of each one's bucket
        active = np.flatnonzero(end - np.arange(n, dtype=index) > 1).astype(index)  # has a bucket-mate after it
        step = 1
        while active.size:  # compare position p with p + step, for every p whose bucket reaches that far
            other = active + step
            distance = np.bitwise_count(sorted_hashes[active] ^ sorted_hashes[other])
            hit = np.flatnonzero(distance <= max_distance)
            if hit.size:
                a, b = order[active[hit]], order[other[hit]]
                first_band = np.ones(len(hit), dtype=bool)
                for earlier in keys[:band]:  # equal on an earlier band: found there already
                    first_band &= earlier[a] != earlier[b]
                a, b = a[first_band], b[first_band]
                found.append((np.minimum(a, b), np.maximum(a, b), distance[hit][first_band].astype(np.uint8)))
            step += 1
            active = active[end[active] - active > step]
    if not found:
        return np.empty(0, dtype=index), np.empty(0, dtype=index), np.empty(0, dtype=np.uint8)
    a, b, distance = (np.concatenate(part) for part in zip(*found, strict=True))
    order = np.lexsort((b, a))
    return a[order], b[order], distance[order]


def hamming_pairs_all(hashes: np.ndarray, max_distance: int, block_cells: int = 1 << 24) -> tuple[np.ndarray, ...]:
    """The same as `hamming_pairs` by comparing all pairs (quadratic): the reference it is tested against."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    found = [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint8))]
    chunk = max(1, block_cells // max(len(hashes), 1))
    for start in range(0, len(hashes), chunk):
        distance = np.bitwise_count(hashes[start : start + chunk, None] ^ hashes[None, start:])
        i, j = np.nonzero(distance <= max_distance)
        later = j > i  # j is counted from `start`, i from the block's start: the same origin
        found.append((start + i[later], start + j[later], distance[i[later], j[later]].astype(np.uint8)))
    a, b, distance = (np.concatenate(part) for part in zip(*found, strict=True))
    order = np.lexsort((b, a))
    return a[order], b[order], distance[order]


@dataclass
class NearDuplicates:
    """Pairs of distinct kept contents whose perceptual hashes are at most `max_distance` bits apart.

    `contents` holds one row per content (path, label, sha256: its first path by name) and `hashes` their 64-bit
    perceptual hashes; a pair is two row numbers a < b of it with their distance: arrays, not Python objects, so
    a million images with many pairs stay small. `write_csv` streams them out (near_duplicates.csv, sorted by
    path_a, path_b)."""

    contents: pd.DataFrame
    hashes: np.ndarray
    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray
    max_distance: int

    def __len__(self) -> int:
        return len(self.a)

    def across_labels(self) -> int:
        labels = self.contents.label.to_numpy()
        return int(np.count_nonzero(labels[self.a] != labels[self.b]))

    def frame(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Pairs start..stop as near_duplicates.csv's rows."""
        a, b = self.a[start:stop], self.b[start:stop]
        paths, labels = self.contents.path.to_numpy(), self.contents.label.to_numpy()
        return pd.DataFrame(
            {
                "path_a": paths[a],
                "path_b": paths[b],
                "label_a": labels[a],
                "label_b": labels[b],
                "distance": self.distance[start:stop].astype(int),
                "same_label": labels[a] == labels[b],
            },
            columns=NEAR_DUPLICATE_COLUMNS,
        )

    def write_csv(self, path: str | Path, chunk: int = 100_000) -> None:
        with atomic_path(path) as tmp:
            self.frame(0, 0).to_csv(tmp, index=False, lineterminator="\n")
            for start in range(0, len(self), chunk):
                self.frame(start, start + chunk).to_csv(tmp, index=False, header=False, mode="a", lineterminator="\n")


def near_duplicate_pairs(manifest: pd.DataFrame, max_distance: int) -> NearDuplicates:
    """Pairs of kept files with different content whose perceptual hashes differ in at most `max_distance`
    of 64 bits, one per pair of distinct contents (the first path of each, by name), with the distance."""
    ok = manifest[(manifest.status == "ok") & (manifest.phash != "")]
    contents = ok.sort_values("path").drop_duplicates("sha256").reset_index(drop=True)
    hashes = np.array([int(h, 16) for h in contents.phash], dtype=np.uint64)
    a, b, distance = hamming_pairs(hashes, max_distance)
    # contents are sorted by path, so a < b is path_a < path_b and the pairs come sorted by (path_a, path_b)
    return NearDuplicates(contents[["path", "label", "sha256"]], hashes, a, b, distance, max_distance)


def near_copy_leaders(count: int, near: NearDuplicates) -> np.ndarray:
    """For each of `count` contents (in path order), the first content of its near-copy group.

    Content b joins the group of its first earlier near-copy a (within the distance d) whose group's first
    member is within 2d of b; otherwise b starts a group. So a copy joins its original's group even when the
    original is itself a member (two copies of one scan, each d bits from it, are up to 2d apart), but every
    member stays within 2d of the group's first: a chain of small steps (a to b to c ...) cannot merge unlike
    images into one large group, as single linkage (a union of all pairs) can."""
    leader = np.arange(count)
    hashes = near.hashes
    radius = 2 * near.max_distance
    later_first = np.lexsort((near.a, near.b))
    for a, b in zip(near.a[later_first].tolist(), near.b[later_first].tolist(), strict=True):
        # pairs by b, then a: when b's pairs come, every earlier content is settled
        if leader[b] == b and int(np.bitwise_count(hashes[b] ^ hashes[leader[a]])) <= radius:
            leader[b] = leader[a]
    return leader


def group_near_duplicates(manifest: pd.DataFrame, near: NearDuplicates) -> pd.DataFrame:
    """Set `group` so that near-copies (and their exact copies) share one, by `near_copy_leaders`' rule: the
    smallest sha256 of each group. Split keeps a group in one split, as it does an exact copy (a pair whose
    contents end in two groups may end in two splits: `pairs_apart` counts them)."""
    leaders = near_copy_leaders(len(near.contents), near)
    sha = near.contents.sha256.to_numpy()
    smallest = pd.Series(sha).groupby(leaders).transform("min").to_numpy()
    group_of = dict(zip(sha, smallest, strict=True))
    manifest = manifest.copy()
    ok = (manifest.status == "ok") & manifest.sha256.isin(group_of)
    manifest.loc[ok, "group"] = manifest.sha256[ok].map(group_of)
    return manifest


def pairs_apart(manifest: pd.DataFrame, near: NearDuplicates) -> int:
    """How many near-duplicate pairs have their two contents in different groups of `manifest`."""
    ok = manifest[manifest.status == "ok"]
    group_of = dict(zip(ok.sha256, ok.group, strict=False))
    groups = near.contents.sha256.map(group_of).to_numpy()
    return int(np.count_nonzero(groups[near.a] != groups[near.b]))


def union_groups(manifest: pd.DataFrame, links: pd.DataFrame) -> pd.DataFrame:
    """Merge the groups of every linked pair of paths (links: path_a, path_b) into one, transitively (union):
    the smallest sha256 of each connected set becomes its `group`."""
    manifest = manifest.copy()
    sha_of = dict(zip(manifest.path, manifest.sha256, strict=True))
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for a, b in zip(links.path_a, links.path_b, strict=True):
        ra, rb = find(sha_of[a]), find(sha_of[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ok = manifest.status == "ok"
    manifest.loc[ok, "group"] = [find(h) for h in manifest.sha256[ok]]
    return manifest
