"""Scan a folder into the manifest: every file found, kept or skipped with its reason; the folder layout
(plain class folders, or provided Training/Testing splits); the classes found.

Folder layouts understood (labels are always class-folder names):
  root/<class>/...                                  plain
  root/{Training,Testing}/<class>/...               provided splits (also train/val/test, valid, validation)
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf.core.errors import UserError, log
from imgclf.core.io import sha256_file
from imgclf.data.groups import confirmation_thumbnail, perceptual_hash
from imgclf.data.images import DEFAULT_RECIPE, ImageRecipe, ImageSkip, decode_image, is_image_file

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
    "frame",
]


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


def _visible_folders(folder: Path) -> list[Path]:
    """Sub-folders that can hold classes: not hidden, not macOS's __MACOSX."""
    try:
        return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")
    except OSError as exc:
        raise UserError(f"cannot read the folder {folder} ({exc.strerror or exc}); fix its permissions") from None


def detect_layout(root: Path) -> tuple[bool, list[str]]:
    """(split layout?, other top-level folders). root holds provided split folders (Training/Testing,
    train/val/test, ...) when a validation or test folder is among its sub-folders; any other top-level folder
    (masks/, a nested copy of the dataset) is then not a class: its files are skipped with their reason and the
    folders are returned so that prepare can name them. Ambiguous layouts stop with one line: a split folder
    with no class sub-folders (images straight in it, or empty), or test/validation folders without a training
    folder. A class folder named `train` next to other classes, with no test or validation folder, stays a
    class (prepare warns)."""
    subdirs = _visible_folders(root)
    split_named = [d for d in subdirs if d.name.lower() in SPLIT_FOLDERS]
    if not any(SPLIT_FOLDERS[d.name.lower()] in ("val", "test") for d in split_named):
        if split_named:
            log.warning(
                "prepare: class folder(s) named like a split (%s) but no validation or test folder: read as "
                "class(es); for provided splits add a Testing/ (or test/) folder of class sub-folders",
                ", ".join(d.name for d in split_named),
            )
        return False, []
    others = [d.name for d in subdirs if d.name.lower() not in SPLIT_FOLDERS]
    for d in split_named:
        if not any(d.iterdir()):
            raise UserError(
                f"data.root={str(root)!r}: the split folder {d.name}/ is empty; remove it or add its images"
            )
        if not _visible_folders(d):
            raise UserError(
                f"data.root={str(root)!r} has split folders ({', '.join(x.name for x in split_named)}), but "
                f"{d.name}/ holds no class sub-folders; expected {d.name}/<class>/<image>: move its images into "
                "class folders, or rename the split-named folders if they are classes"
            )
    if not any(SPLIT_FOLDERS[d.name.lower()] == "train" for d in split_named):
        raise UserError(
            f"data.root={str(root)!r} has {', '.join(d.name for d in split_named)}/ but no training folder "
            f"(Training/ or train/); the other folders ({', '.join(others) or 'none'}) would be ignored. Put the "
            "training images in Training/<class>/, or rename the split-named folders if they are classes"
        )
    return True, others


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


def scan_folder(
    root: str | Path, options: ScanOptions = ScanOptions(), thumbnails: dict[str, Any] | None = None
) -> pd.DataFrame:
    """One manifest row for every file found below `root`, with status ok|skipped and a reason. With a
    `thumbnails` dict (and options.perceptual_hash), each kept content's confirmation thumbnail is put in it,
    by sha256, while the image is decoded: what near-copy confirmation compares (kept out of the manifest)."""
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
        if not is_image_file(path):
            row["reason"] = f"not an image extension ({path.suffix or 'none'}) and not DICOM content"
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
        row.update(width=im.width, height=im.height, mode=mode, format=fmt, frame=im.info.get("frame", ""))
        if min(im.size) < options.min_side:
            row["reason"] = f"too small: {im.width}x{im.height} px, below data.min_side={options.min_side}"
            continue
        if options.perceptual_hash:
            row["phash"] = perceptual_hash(im)
            if thumbnails is not None and row["sha256"] not in thumbnails:
                thumbnails[row["sha256"]] = confirmation_thumbnail(im)
        row["status"], row["reason"], row["group"] = "ok", "", row["sha256"]
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if manifest.empty:
        raise UserError(f"data.root={str(root)!r} holds no files; expected one sub-folder of images per class")
    return manifest


def summary_line(manifest: pd.DataFrame) -> str:
    found, kept = len(manifest), int((manifest.status == "ok").sum())
    skipped = manifest[manifest.status == "skipped"]
    by_reason = Counter(r.split(" (")[0].split(":")[0] for r in skipped.reason)
    detail = ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items())) if by_reason else "none"
    return f"found {found} files: kept {kept}, skipped {len(skipped)} ({detail})"


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


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    return {label: int(n) for label, n in sorted(Counter(df.label).items())}
