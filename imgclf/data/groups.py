"""Which images belong together: identical content under two labels (label conflicts), and near-copies
(re-encoded, resized) found by perceptual hash and joined into groups that split keeps in one split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

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


def near_duplicate_pairs(manifest: pd.DataFrame, max_distance: int, block_cells: int = 1 << 24) -> pd.DataFrame:
    """Pairs of kept files with different content whose perceptual hashes differ in at most `max_distance`
    of 64 bits, one row per pair of distinct contents (first path of each), with the distance."""
    ok = manifest[(manifest.status == "ok") & (manifest.phash != "")]
    unique = ok.sort_values("path").drop_duplicates("sha256").reset_index(drop=True)
    hashes = np.array([int(h, 16) for h in unique.phash], dtype=np.uint64)
    rows = []
    chunk = max(1, block_cells // max(len(hashes), 1))  # a block of comparisons stays ~16 M cells (~150 MB)
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, start:])  # (b, N - start): Hamming distances
        for i, j in zip(*np.nonzero(distance <= max_distance), strict=True):
            a, b = start + int(i), start + int(j)
            if a < b:
                rows.append((a, b, int(distance[i, j])))
    pairs = [
        {
            "path_a": unique.path[a],
            "path_b": unique.path[b],
            "label_a": unique.label[a],
            "label_b": unique.label[b],
            "distance": d,
            "same_label": bool(unique.label[a] == unique.label[b]),
        }
        for a, b, d in rows
    ]
    return pd.DataFrame(pairs, columns=NEAR_DUPLICATE_COLUMNS).sort_values(["path_a", "path_b"], ignore_index=True)


def group_near_duplicates(manifest: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Set `group` so that near-copies (and, through them, their exact copies) share one: the smallest
    sha256 of each connected set. Split keeps a group in one split, as it does an exact copy."""
    manifest = manifest.copy()
    sha_of = dict(zip(manifest.path, manifest.sha256, strict=True))
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for a, b in zip(pairs.path_a, pairs.path_b, strict=True):
        ra, rb = find(sha_of[a]), find(sha_of[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ok = manifest.status == "ok"
    manifest.loc[ok, "group"] = [find(h) for h in manifest.sha256[ok]]
    return manifest
