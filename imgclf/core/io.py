"""Atomic file output: a result is either complete at its final path or absent, never half-written.

Every writer goes through `atomic_path`: write to a hidden temporary name beside the target, then
`os.replace` it into place (atomic on POSIX within one file system). A stage killed part-way leaves
no file that looks complete, and DVC reruns it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `path` (file or directory)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that was killed part-way (DVC runs one stage per target at a time).
    for stale in target.parent.glob(f".tmp-*-{glob.escape(target.name)}"):
        _remove(stale)
    # Keep the real suffix last: some writers (Keras, matplotlib) choose the format from it.
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, data: Any, sort_keys: bool = True) -> None:
    """Write JSON with a final newline, so equal data gives equal bytes: keys sorted, or (sort_keys=False, for
    metrics whose order is what a reader sees first) in the order given."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# Columns that hold text, whatever they look like: a class folder named `0`, `007` or `NA` is a label, not a
# number or a missing value; a sha256 of digits only is still a hash.
TEXT_COLUMNS = ("path", "label", "actual", "predicted", "sha256", "group", "phash", "provided_split", "status",
                "reason", "mode", "format", "error", "labels", "path_a", "path_b", "label_a", "label_b", "given",
                "suggested", "linked_to")  # fmt: skip


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV the pipeline wrote: text columns stay text (labels `0` and `007` are two classes)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split(",")
    text = {c: str for c in header if c in TEXT_COLUMNS}
    return pd.read_csv(path, dtype=text, keep_default_na=False)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically, without run-dependent metadata, and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def save_keras(model: Any, path: str | Path) -> None:
    """Save a Keras model as deterministic bytes: the same weights give the same file.

    A `.keras` file is a zip whose metadata.json holds the save date, whose weights entry carries the save
    time, and whose config.json numbers shared objects by their memory address (`shared_object_id`); all
    three change on every run (and with them DVC's hash of the model). The weights themselves are written
    deterministically, so the archive is rewritten with a fixed entry time, no save date, and the shared
    objects numbered 0, 1, 2... in order of appearance (the loader only matches equal ids within one file).
    """
    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as src:
            entries = [(info, src.read(info)) for info in src.infolist()]
        with zipfile.ZipFile(tmp, "w") as dst:
            for info, data in entries:
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                elif info.filename == "config.json":
                    data = json.dumps(_renumber_shared_objects(json.loads(data), {})).encode()
                fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
                dst.writestr(fixed, data)


def _renumber_shared_objects(node: Any, ids: dict[Any, int]) -> Any:
    """Replace every `shared_object_id` (a memory address) by its order of first appearance."""
    if isinstance(node, dict):
        return {
            k: ids.setdefault(v, len(ids)) if k == "shared_object_id" else _renumber_shared_objects(v, ids)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_renumber_shared_objects(v, ids) for v in node]
    return node
