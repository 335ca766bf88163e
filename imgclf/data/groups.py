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

NEAR_DUPLICATE_COLUMNS = ["path_a", "path_b", "label_a", "label_b", "distance", "score", "confirmed", "same_label"]


def resolve_conflicts(
    manifest: pd.DataFrame, rule: str, provided_wins: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply the label-conflict rule to kept rows whose content (sha256) appears under several labels.

    With `provided_wins` (data.use_provided_splits), a provided test folder is never changed by a copy elsewhere:
    when a conflicting content has copies in the provided test folder (else the provided validation folder),
    those copies are kept as given and every other copy is skipped (a conflict inside that folder itself is
    kept as given too, and prepare warns of it). Otherwise skip: every copy is skipped; majority: copies
    under the most frequent label are kept, the others skipped, and a tie skips all. Returns the updated
    manifest and a report (one row per conflicting file)."""
    manifest = manifest.copy()
    ok = manifest[manifest.status == "ok"]
    labels_per_hash = ok.groupby("sha256")["label"].nunique()
    conflicted = labels_per_hash[labels_per_hash > 1].index
    provided = ok.provided_split if "provided_split" in ok else pd.Series("", index=ok.index)
    report_rows = []
    for digest in sorted(conflicted):
        group = ok[ok.sha256 == digest]
        counts = Counter(group.label)
        ranked = counts.most_common()
        folder = next((name for name in ("test", "val") if (provided[group.index] == name).any()), None)
        folder = folder if provided_wins else None
        if folder:
            keep_rows = set(group.index[provided[group.index] == folder])
            why = f"a copy is in the provided {'test' if folder == 'test' else 'validation'} folder, kept as given"
        else:
            winner = ranked[0][0] if rule == "majority" and ranked[0][1] > ranked[1][1] else None
            keep_rows = set(group.index[group.label == winner])
            why = f"data.label_conflicts={rule}"
        for idx, row in group.iterrows():
            keep = idx in keep_rows
            if not keep:
                manifest.loc[idx, "status"] = "skipped"
                manifest.loc[idx, "reason"] = f"label conflict: same content under {', '.join(sorted(counts))} ({why})"
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


THUMBNAIL_SIDE = 32  # the confirmation thumbnail's side (bench/near_copies.py: why 32)
SCORE_DECIMALS = 6  # near_duplicates.csv's score, floored; the confirmation compares the exact value


def confirmation_thumbnail(im: Any, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The image as a side x side grey thumbnail (uint8), made while prepare has it decoded: what confirms a
    hash candidate. Pillow's resize of 8-bit images is integer arithmetic, so the bytes do not depend on the CPU."""
    from PIL import Image

    return np.asarray(im.convert("L").resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)


def thumbnail_correlation(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Pearson correlation of thumbnails a[k] and b[k] (rows of `thumbs`, (n, side, side) uint8), for each k.

    The sums are exact integers, so a score is the same on every CPU. Invariant to brightness and contrast
    (a linear change of the pixel values); 1.0 for two flat thumbnails of equal value, 0.0 when one is flat and
    the other not or the two flat values differ (no pattern to compare)."""
    if len(a) == 0:
        return np.empty(0, dtype=np.float64)
    flat = thumbs.reshape(len(thumbs), -1)
    m = flat.shape[1]
    total = flat.sum(axis=1, dtype=np.int64)
    squares = np.einsum("ij,ij->i", flat, flat, dtype=np.int64)
    spread = m * squares - total * total  # m^2 x variance: 0 for a flat thumbnail
    out = np.empty(len(a), dtype=np.float64)
    for start in range(0, len(a), chunk):
        i, j = a[start : start + chunk], b[start : start + chunk]
        cross = np.einsum("ij,ij->i", flat[i], flat[j], dtype=np.int64)
        covariance = (m * cross - total[i] * total[j]).astype(np.float64)
        scale = np.sqrt(spread[i].astype(np.float64) * spread[j].astype(np.float64))
        flat_both = (spread[i] == 0) & (spread[j] == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(scale > 0, covariance / scale, 0.0)
        out[start : start + chunk] = np.where(flat_both, (total[i] == total[j]).astype(np.float64), score)
    return out


@dataclass
class NearDuplicates:
    """Candidate pairs of distinct kept contents (perceptual hashes at most `max_distance` bits apart), each with
    its confirmation score (the correlation of the two contents' grey thumbnails) and whether it was confirmed
    (score >= `min_score`): only confirmed pairs are near-copies.

    `contents` holds one row per content (path, label, sha256: its first path by name) and `hashes` their 64-bit
    perceptual hashes; a pair is two row numbers a < b of it: arrays, not Python objects, so a million images
    with many pairs stay small. `write_csv` streams them out (near_duplicates.csv, sorted by path_a, path_b)."""

    contents: pd.DataFrame
    hashes: np.ndarray
    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray
    score: np.ndarray
    max_distance: int
    min_score: float

    def __len__(self) -> int:
        return len(self.a)

    @property
    def confirmed(self) -> np.ndarray:
        return self.score >= self.min_score

    def across_labels(self) -> int:
        """Confirmed pairs whose two contents carry different labels."""
        labels = self.contents.label.to_numpy()
        return int(np.count_nonzero((labels[self.a] != labels[self.b]) & self.confirmed))

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
                # floored, so that a printed score at or above the threshold is a confirmed one
                "score": np.floor(self.score[start:stop] * 10**SCORE_DECIMALS) / 10**SCORE_DECIMALS,
                "confirmed": self.confirmed[start:stop],
                "same_label": labels[a] == labels[b],
            },
            columns=NEAR_DUPLICATE_COLUMNS,
        )

    def write_csv(self, path: str | Path, chunk: int = 100_000) -> None:
        with atomic_path(path) as tmp:
            self.frame(0, 0).to_csv(tmp, index=False, lineterminator="\n")
            for start in range(0, len(self), chunk):
                self.frame(start, start + chunk).to_csv(
                    tmp, index=False, header=False, mode="a", lineterminator="\n", float_format=f"%.{SCORE_DECIMALS}f"
                )


def near_duplicate_pairs(
    manifest: pd.DataFrame, max_distance: int, thumbnails: dict[str, np.ndarray], min_score: float
) -> NearDuplicates:
    """Candidate pairs of kept files with different content whose perceptual hashes differ in at most
    `max_distance` of 64 bits, one per pair of distinct contents (the first path of each, by name), each scored
    by the correlation of the contents' thumbnails (`thumbnails`: sha256 -> confirmation_thumbnail, as
    scan_folder collects them) and confirmed when the score is at least `min_score`."""
    ok = manifest[(manifest.status == "ok") & (manifest.phash != "")]
    contents = ok.sort_values("path").drop_duplicates("sha256").reset_index(drop=True)
    hashes = np.array([int(h, 16) for h in contents.phash], dtype=np.uint64)
    a, b, distance = hamming_pairs(hashes, max_distance)
    missing = [digest for digest in contents.sha256 if digest not in thumbnails]
    if missing:
        raise ValueError(f"{len(missing)} kept contents have no thumbnail (e.g. sha256 {missing[0][:12]})")
    used = np.unique(np.concatenate([a, b]))  # only the candidates' thumbnails, in one array
    thumbs = np.empty((len(used), THUMBNAIL_SIDE, THUMBNAIL_SIDE), dtype=np.uint8)
    for row, i in enumerate(used.tolist()):
        thumbs[row] = thumbnails[contents.sha256[i]]
    score = thumbnail_correlation(thumbs, np.searchsorted(used, a), np.searchsorted(used, b))
    # contents are sorted by path, so a < b is path_a < path_b and the pairs come sorted by (path_a, path_b)
    return NearDuplicates(contents[["path", "label", "sha256"]], hashes, a, b, distance, score, max_distance, min_score)


def splitmix64(count: int, seed: int = 0) -> np.ndarray:
    """`count` pseudo-random uint64 (SplitMix64): written out here so that the numbers, and what is computed
    from them, do not change with NumPy's generators."""
    with np.errstate(over="ignore"):
        z = (np.arange(1, count + 1, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def chance_pairs(hashes: np.ndarray, max_distance: int, samples: int = 5_000_000, chunk: int = 1_000_000) -> float:
    """How many pairs of these hashes would be within `max_distance` bits if pairs were drawn at random: the
    share of `samples` random pairs of distinct hashes within the distance, times all pairs. True copies are
    too rare among random pairs to move it; on images whose hash bits are not independent (small centred
    objects on black) it is far above the 64-bit binomial's estimate. The hashes are sorted first and the
    draws are SplitMix64's, so file names and NumPy's version do not change it. Many samples, because the
    share is small on large sets (70,000 images: about 1 pair in 10,000 within 4 bits, so 5,000,000 draws give
    some 500 hits and a relative error near 5%), drawn `chunk` at a time to bound memory."""
    n = len(hashes)
    if n < 2:
        return 0.0
    ordered = np.sort(np.asarray(hashes, dtype=np.uint64))
    hits = 0
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        draws = splitmix64(2 * size, seed=2 * start)
        i = (draws[:size] % np.uint64(n)).astype(np.int64)
        j = (i + 1 + (draws[size:] % np.uint64(n - 1)).astype(np.int64)) % n  # never i itself
        hits += int(np.count_nonzero(np.bitwise_count(ordered[i] ^ ordered[j]) <= max_distance))
    return hits / samples * n * (n - 1) / 2


def group_confirmed(manifest: pd.DataFrame, near: NearDuplicates) -> pd.DataFrame:
    """Set `group` so that every confirmed pair (and their exact copies) shares one: the union of confirmed
    pairs (`union_groups`), each group named by its smallest sha256. A union does not depend on file names or
    their order, and no confirmed pair can end in two groups, so split (which keeps a group in one split) never
    separates one."""
    keep = near.confirmed
    paths = near.contents.path.to_numpy()
    return union_groups(manifest, pd.DataFrame({"path_a": paths[near.a[keep]], "path_b": paths[near.b[keep]]}))


def pairs_apart(manifest: pd.DataFrame, near: NearDuplicates) -> int:
    """How many confirmed pairs have their two contents in different groups of `manifest` (0 after
    group_confirmed: a check, not a measure)."""
    ok = manifest[manifest.status == "ok"]
    group_of = dict(zip(ok.sha256, ok.group, strict=False))
    groups = near.contents.sha256.map(group_of).to_numpy()
    return int(np.count_nonzero((groups[near.a] != groups[near.b]) & near.confirmed))


LINKED_SPLITS = ("test", "val")


def linked_splits(manifest: pd.DataFrame, near: NearDuplicates | None, subjects: pd.Series | None) -> pd.Series:
    """For each kept row, the provided test and validation folders (`test;val`, `test`, `val` or empty) that hold
    an image it must not be separated from: the same content, a confirmed near-copy of its content, or (with
    `subjects`, keyed like the manifest's rows) the same subject. Split holds a row out of training when it is
    linked to the provided test (or validation) folder: decided pair by pair, so a look-alike of a look-alike
    of a test image is not held out, while a patient is held out whole."""
    ok = manifest[manifest.status == "ok"]
    by_content: dict[str, set[str]] = {}
    for digest, provided in zip(ok.sha256, ok.provided_split, strict=True):
        if provided in LINKED_SPLITS:
            by_content.setdefault(digest, set()).add(provided)
    linked = {digest: set(found) for digest, found in by_content.items()}
    if near is not None:
        sha = near.contents.sha256.to_numpy()
        keep = near.confirmed
        for i, j in zip(near.a[keep].tolist(), near.b[keep].tolist(), strict=True):
            for x, y in ((sha[i], sha[j]), (sha[j], sha[i])):
                if y in by_content:
                    linked.setdefault(x, set()).update(by_content[y])
    out = [set(linked.get(digest, ())) for digest in ok.sha256]
    if subjects is not None:
        keys = subjects.reindex(ok.index)
        by_subject: dict[str, set[str]] = {}
        for key, provided in zip(keys, ok.provided_split, strict=True):
            if isinstance(key, str) and provided in LINKED_SPLITS:
                by_subject.setdefault(key, set()).add(provided)
        out = [found | by_subject.get(key, set()) for found, key in zip(out, keys, strict=True)]
    return pd.Series([";".join(sorted(found)) for found in out], index=ok.index, dtype=object)


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
