"""The data half of the pipeline: scan a folder into a manifest, resolve label conflicts, find
near-duplicates, split (stratified; identical files and near-copies kept together) and balance the
training split.

Folder layouts understood (labels are always class-folder names):
  root/<class>/...                                  plain
  root/{Training,Testing}/<class>/...               provided splits (also train/val/test, valid, validation)
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.errors import UserError, log
from imgclf.images import DEFAULT_RECIPE, IMAGE_EXTENSIONS, ImageRecipe, ImageSkip, decode_image
from imgclf.io import sha256_file

# Folder names (lower-case) that mean "a provided split", and the split they stand for.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"})
MANIFEST_COLUMNS = [
    "path",
    "label",
    "provided_split",
    "status",
    "reason",
    "sha256",
    "bytes",
    "width",
    "height",
    "mode",
    "format",
    "phash",
    "group",
]
SPLITS = ("train", "val", "test")


NEAR_DUPLICATE_COLUMNS = ["path_a", "path_b", "label_a", "label_b", "distance", "same_label"]


@dataclass(frozen=True)
class ScanOptions:
    min_side: int = 16
    recipe: ImageRecipe = DEFAULT_RECIPE
    perceptual_hash: bool = True  # compute each kept image's 64-bit pHash (for near-duplicates)


def _walk_files(root: Path) -> list[Path]:
    """Every file below root, symlinks followed but each real folder visited once (no loops), sorted."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        raise UserError(
            f"cannot read the folder {exc.filename} ({exc.strerror}): its files could not be accounted for; "
            "fix its permissions or move it out of data.root"
        )

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in filenames)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def detect_layout(root: Path) -> tuple[bool, list[str]]:
    """(split layout?, other top-level folders). root holds provided split folders (Training/Testing,
    train/val/test, ...) when a validation or test folder is among its sub-folders; any other top-level folder
    (masks/, a nested copy of the dataset) is then not a class: its files are skipped with their reason and the
    folders are returned so that prepare can name them. Split-named folders that hold images but no class
    sub-folders are ambiguous (classes named like splits?): one clear error. A class folder named `train`
    next to other classes, with no test or validation folder, stays a class (prepare warns)."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")
    split_named = [d for d in subdirs if d.name.lower() in SPLIT_FOLDERS]
    if not any(SPLIT_FOLDERS[d.name.lower()] in ("val", "test") for d in split_named):
        if split_named:
            log.warning(
                "prepare: class folder(s) named like a split (%s) but no validation or test folder: read as "
                "class(es); for provided splits add a Testing/ (or test/) folder of class sub-folders",
                ", ".join(d.name for d in split_named),
            )
        return False, []
    flat = [d.name for d in split_named if not any(c.is_dir() for c in d.iterdir())]
    if flat:
        raise UserError(
            f"data.root={str(root)!r} has split folders ({', '.join(d.name for d in split_named)}), but "
            f"{flat[0]}/ holds no class sub-folders; expected {flat[0]}/<class>/<image>: move its images into "
            "class folders, or rename the split-named folders if they are classes"
        )
    return True, [d.name for d in subdirs if d.name.lower() not in SPLIT_FOLDERS]


def _label_and_split(rel: Path, split_layout: bool) -> tuple[str | None, str, str | None]:
    """(label, provided split, reason to skip) from a path relative to root."""
    parts = rel.parts
    if split_layout:
        top = parts[0].lower()
        if top not in SPLIT_FOLDERS:
            return None, "", f"not under a split folder ({', '.join(sorted(set(SPLIT_FOLDERS)))})"
        if len(parts) < 3:
            return None, SPLIT_FOLDERS[top], "not in a class folder"
        return parts[1], SPLIT_FOLDERS[top], None
    if len(parts) < 2:
        return None, "", "not in a class folder"
    return parts[0], "", None


def scan_folder(root: str | Path, options: ScanOptions = ScanOptions()) -> pd.DataFrame:
    """One manifest row for every file found below `root`, with status ok|skipped and a reason."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data.root={str(root)!r} does not exist; set data.root to a folder of class sub-folders")
    if not root.is_dir():
        raise UserError(f"data.root={str(root)!r} is a file, not a folder of class sub-folders")
    split_layout, ignored = detect_layout(root)
    if ignored:
        log.warning(
            "prepare: provided split folders found; ignoring the other top-level folder(s) %s (their files are "
            "in the manifest as skipped: not under a split folder)",
            ", ".join(f"{name}/" for name in ignored),
        )
    rows = []
    for path in _walk_files(root):
        rel = path.relative_to(root)
        row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(path=rel.as_posix(), status="skipped", bytes=0, width=0, height=0)
        label, provided, reason = _label_and_split(rel, split_layout)
        row["label"], row["provided_split"] = label or "", provided
        rows.append(row)
        if any(p.startswith(".") or p == "__MACOSX" for p in rel.parts) or path.name.lower() in SYSTEM_FILES:
            row["reason"] = "hidden or system file"
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            row["reason"] = f"not an image extension ({path.suffix or 'none'})"
            continue
        if reason:
            row["reason"] = reason
            continue
        try:
            row["bytes"] = path.stat().st_size
        except OSError as exc:  # a dangling symlink
            row["reason"] = f"unreadable ({exc.strerror})"
            continue
        if row["bytes"] == 0:
            row["reason"] = "empty file (0 bytes)"
            continue
        try:
            row["sha256"] = sha256_file(path)
        except OSError as exc:  # no read permission, or an I/O error
            row["reason"] = f"unreadable ({exc.strerror or exc})"
            continue
        try:
            im, mode, fmt = decode_image(path, options.recipe)
        except ImageSkip as exc:
            row["reason"] = str(exc)
            continue
        row.update(width=im.width, height=im.height, mode=mode, format=fmt)
        if min(im.size) < options.min_side:
            row["reason"] = f"too small: {im.width}x{im.height} px, below data.min_side={options.min_side}"
            continue
        if options.perceptual_hash:
            row["phash"] = perceptual_hash(im)
        row["status"], row["reason"], row["group"] = "ok", "", row["sha256"]
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if manifest.empty:
        raise UserError(f"data.root={str(root)!r} holds no files; expected one sub-folder of images per class")
    return manifest


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


def check_classes(manifest: pd.DataFrame) -> list[str]:
    """The class names (sorted); stops when there are fewer than two or a class has no usable image."""
    with_label = manifest[manifest.label != ""]
    all_labels = sorted(set(with_label.label))
    usable = Counter(manifest[manifest.status == "ok"].label)
    empty = [label for label in all_labels if usable[label] == 0]
    if empty:
        reasons = Counter(with_label[with_label.label.isin(empty)].reason)
        detail = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "no files"
        raise UserError(
            f"class folder(s) {', '.join(map(repr, empty))} hold no usable image ({detail}); "
            "add images or remove the folder"
        )
    if len(all_labels) < 2:
        raise UserError(
            f"found {len(all_labels)} class folder(s) ({', '.join(all_labels) or 'none'}) with usable images; "
            "classification needs at least two: put each class's images in its own sub-folder of data.root"
        )
    return all_labels


def summary_line(manifest: pd.DataFrame) -> str:
    found, kept = len(manifest), int((manifest.status == "ok").sum())
    skipped = manifest[manifest.status == "skipped"]
    by_reason = Counter(r.split(" (")[0].split(":")[0] for r in skipped.reason)
    detail = ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items())) if by_reason else "none"
    return f"found {found} files: kept {kept}, skipped {len(skipped)} ({detail})"


HELD_OUT = "held_out"


def _group_key(ok: pd.DataFrame) -> pd.Series:
    """What split keeps together: the group prepare formed (near-copies), else the content hash."""
    return ok.group.where(ok.group != "", ok.sha256) if "group" in ok else ok.sha256


def held_out(manifest: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The kept rows that split_manifest put in no split (copies or near-copies of a provided test or
    validation image, found in another split's folder), with the reason."""
    ok = manifest[manifest.status == "ok"]
    placed = set().union(*(set(df.path) for df in splits.values()))
    rows = ok[~ok.path.isin(placed)].copy()
    key, test_keys = _group_key(rows), set(_group_key(splits["test"]))
    rows["reason"] = [
        f"a copy or near-copy of an image in the provided {'test' if k in test_keys else 'validation'} folder"
        for k in key
    ]
    return rows.sort_values("path").reset_index(drop=True)


def _allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Whole counts per split for n groups: each split >= 1, val/test rounded, train takes the rest."""
    counts = {name: max(1, round(n * frac)) for name, frac in fractions.items() if name != "train"}
    counts["train"] = n - sum(counts.values())
    return counts


def split_manifest(
    manifest: pd.DataFrame, val: float, test: float, seed: int, use_provided_splits: bool = True
) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test split of the kept rows; each group (identical content, and near-copies
    when prepare grouped them) lies in exactly one split.

    With provided split folders and use_provided_splits, the provided test folder is the test split exactly
    as given, and the provided validation folder is the validation split less any copy of a test image (so
    early stopping never sees one): results stay comparable with the official split. A copy or near-copy of
    a test (validation) image elsewhere would leak it into training; such rows are held out of every split,
    not moved into test. `held_out` lists them. The rest is split per class with the ratios (as fractions
    of what is being split).
    """
    ok = manifest[manifest.status == "ok"].reset_index(drop=True)
    key = _group_key(ok)
    assigned = pd.Series("", index=ok.index, dtype=object)
    if use_provided_splits:
        test_keys = set(key[ok.provided_split == "test"])
        assigned[ok.provided_split == "test"] = "test"
        assigned[(ok.provided_split == "val") & ~key.isin(test_keys)] = "val"
        held = set(key[assigned != ""])
        assigned[(assigned == "") & key.isin(held)] = HELD_OUT  # copies of test/val images elsewhere
    fixed = set(assigned[assigned.isin(["val", "test"])])
    fractions = {"train": 1.0}
    if "val" not in fixed:
        fractions["val"] = val
    if "test" not in fixed:
        fractions["test"] = test
    rng = np.random.default_rng(seed)
    others = [f for name, f in fractions.items() if name != "train"]
    needed = max(len(fractions), math.ceil(0.5 / min(others))) if others else 1
    # Each group belongs to the label of its first row, so a group spanning labels (near-copies filed under
    # two classes) is counted and placed once, and no class loses a group it was counted with.
    pool = ok[assigned == ""]
    owner = pool.groupby(key[assigned == ""], sort=False)["label"].first()
    for label in sorted(set(owner)):
        groups = sorted(owner.index[owner == label])
        if len(fractions) > 1 and len(groups) < needed:
            raise UserError(
                f"class {label!r} has {len(groups)} unique image(s); splitting with split.val={val} and "
                f"split.test={test} needs at least {needed} per class; add images, drop the class folder, "
                "or raise the ratios"
            )
        order = rng.permutation(len(groups))
        counts = _allocate(len(groups), fractions)
        if counts["train"] < 1:
            raise UserError(
                f"class {label!r} has {len(groups)} unique image(s): split.val={val} and split.test={test} leave "
                "none for training; add images or lower the ratios"
            )
        start = 0
        for name in ("test", "val", "train"):
            if name not in counts:
                continue
            chosen = {groups[i] for i in order[start : start + counts[name]]}
            start += counts[name]
            assigned[(assigned == "") & key.isin(chosen)] = name  # a group spanning labels moves whole
    ok = ok.assign(split=assigned)
    out = {}
    for name in SPLITS:
        part = ok[ok.split == name].drop(columns=["split"]).sort_values("path").reset_index(drop=True)
        if part.empty:
            raise UserError(f"the {name} split is empty; add images or change split.val / split.test")
        out[name] = part
    for name in ("val", "test"):
        missing = sorted(set(out[name].label) - set(out["train"].label))
        if missing:
            raise UserError(
                f"class(es) {', '.join(map(repr, missing))} appear in {name} but not in train; add training images "
                f"of {'them' if len(missing) > 1 else 'it'}, or remove them from the {name} folder"
            )
    return out


def balance_train(train: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    """Oversample the training split so every class has as many rows as the largest (train only)."""
    if method == "none":
        return train.copy()
    from imblearn.over_sampling import RandomOverSampler

    sampler = RandomOverSampler(random_state=seed)
    index = np.arange(len(train)).reshape(-1, 1)
    resampled, _ = sampler.fit_resample(index, train.label.to_numpy())
    return train.iloc[resampled.ravel()].reset_index(drop=True)


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    return {label: int(n) for label, n in sorted(Counter(df.label).items())}
