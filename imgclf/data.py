"""The data half of the pipeline: scan a folder into a manifest, resolve label conflicts,
split (stratified, identical files kept together) and balance the training split.

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

from imgclf.errors import UserError
from imgclf.images import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageSkip, decode_image
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
]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ScanOptions:
    min_side: int = 16
    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    use_provided_splits: bool = True
    label_conflicts: str = "skip"  # skip | majority


def _walk_files(root: Path) -> list[Path]:
    """Every file below root, symlinks followed but each real folder visited once (no loops), sorted."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in filenames)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def detect_layout(root: Path) -> bool:
    """True when root holds provided split folders (Training/Testing, train/val/test...)."""
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(subdirs) and any(d.name.lower() in SPLIT_FOLDERS for d in subdirs)


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
    split_layout = detect_layout(root)
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
        row["sha256"] = sha256_file(path)
        try:
            im, mode, fmt = decode_image(path, options.background, options.max_pixels)
        except ImageSkip as exc:
            row["reason"] = str(exc)
            continue
        row.update(width=im.width, height=im.height, mode=mode, format=fmt)
        if min(im.size) < options.min_side:
            row["reason"] = f"too small: {im.width}x{im.height} px, below data.min_side={options.min_side}"
            continue
        row["status"], row["reason"] = "ok", ""
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


def min_per_class(val: float, test: float) -> int:
    """Fewest unique images a class needs so that train, val and test each get at least one."""
    return max(3, math.ceil(0.5 / min(val, test)))


def _allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Whole counts per split for n groups: each split >= 1, val/test rounded, train takes the rest."""
    counts = {name: max(1, round(n * frac)) for name, frac in fractions.items() if name != "train"}
    counts["train"] = n - sum(counts.values())
    return counts


def split_manifest(
    manifest: pd.DataFrame, val: float, test: float, seed: int, use_provided_splits: bool = True
) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test split of the kept rows; identical files (same sha256) stay together.

    With provided split folders and use_provided_splits, a provided test (val) folder is the test (val)
    split as is; the files it shares content with are removed from the other splits (leakage).
    The rest is split per class with the ratios (as fractions of what is being split).
    """
    ok = manifest[manifest.status == "ok"].reset_index(drop=True)
    assigned = pd.Series("", index=ok.index, dtype=object)
    if use_provided_splits:
        for name in ("test", "val"):
            assigned[(ok.provided_split == name) & (assigned == "")] = name
    fixed = set(assigned[assigned != ""])
    fractions = {"train": 1.0}
    if "val" not in fixed:
        fractions["val"] = val
    if "test" not in fixed:
        fractions["test"] = test
    # Content already in a provided split pulls every copy there.
    for name in ("test", "val"):
        hashes = set(ok.sha256[assigned == name])
        assigned[(assigned == "") & ok.sha256.isin(hashes)] = name
    pool = ok[assigned == ""]
    rng = np.random.default_rng(seed)
    needed = min_per_class(fractions.get("val", 0.5), fractions.get("test", 0.5))
    for label in sorted(set(pool.label)):
        groups = sorted(set(pool.sha256[pool.label == label]))
        if len(fractions) > 1 and len(groups) < needed:
            raise UserError(
                f"class {label!r} has {len(groups)} unique image(s); splitting with split.val={val} and "
                f"split.test={test} needs at least {needed} per class; add images, drop the class folder, "
                "or raise the ratios"
            )
        order = rng.permutation(len(groups))
        counts = _allocate(len(groups), fractions)
        start = 0
        for name in ("test", "val", "train"):
            if name not in counts:
                continue
            chosen = {groups[i] for i in order[start : start + counts[name]]}
            start += counts[name]
            assigned[(assigned == "") & ok.sha256.isin(chosen) & (ok.label == label)] = name
    ok = ok.assign(split=assigned)
    out = {}
    for name in SPLITS:
        part = ok[ok.split == name].drop(columns=["split"]).sort_values("path").reset_index(drop=True)
        if part.empty:
            raise UserError(f"the {name} split is empty; add images or change split.val / split.test")
        out[name] = part
    missing = sorted(set(out["test"].label) - set(out["train"].label))
    if missing:
        raise UserError(f"class(es) {', '.join(missing)} appear in test but not in train; add training images")
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
