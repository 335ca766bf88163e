"""The backbone pass that computes only new images: a content-addressed store of backbone outputs.

features@<bb> and augment@<bb> rewrite their whole output whenever their image list changes (DVC removes a
stage's outputs before running it). The store sits beside DVC, not inside it: each image's output is kept
under a key of everything that decides its bits, and the next pass copies the outputs it already has and
computes the others. The stage output is byte-identical to a from-scratch pass (tests/test_incremental.py),
which needs an image's output not to depend on the images that share its batch: every batch goes through the
backbone at one shape (backbone_pass.predict_padded).

    <features.cache>/<kind>/<key>/key.json          what the key stands for, readable
    <features.cache>/<kind>/<key>/<shard>.npy       outputs (n, h, w, C) float32, one file per pass that computed
    <features.cache>/<kind>/<key>/<shard>.csv       their items (an image's sha256, or sha256/variant); written
                                                   last, after the .npy is on disk, so a shard without its
                                                   .csv is an interrupted pass, and ignored

The key (a SHA-256 of the record each OutputCache is opened with) covers: the extractor's architecture and
every weight's bytes (backbone, weights, image size, precision, preprocessing), the image recipe, the batch
shape, the engine (this process or Ray workers), the augmentation strengths and seed (augment@), the machine
in the terms that decide the bits (CPU vendor and flags, GPU models and, where a GPU runs, the CUDA, cuDNN,
cuBLAS and driver versions (device.gpu_stack), the threads this process may use, TensorFlow's oneDNN and XLA switches;
TensorFlow, Keras, NumPy, Pillow, pydicom and pylibjpeg versions), a format version, and the source of the
modules that turn a file into an output (`CODE_MODULES`). Anything else changing gives a new key: nothing is
reused. On Ray the machine is each worker's own: every worker reports its record with its rows, each row is
stored under the record of the machine that computed it (a cluster of two node types stores two keys), and a
pass reuses only the outputs of node types its cluster has now (one probe task per node asks). A pass whose
rows come from several machine types says so in a warning.

Why not DVC's `persist`: a persisted output turns off DVC's run cache for its stage and keeps only the last
pass, so switching back to an earlier image size would recompute every image. Why not DVC's own cache: its
layout is DVC's business. The price is disk: one more copy of each output (delete the folder at any time; the
next pass recomputes).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.core.errors import UserError, log
from imgclf.core.io import atomic_path, save_keras, write_csv, write_json
from imgclf.data.images import DEFAULT_RECIPE, ImageRecipe
from imgclf.features.backbone_pass import (
    EXTRACTOR_FILE,
    EXTRACTOR_INFO_FILE,
    EXTRACTOR_KEYS,
    FEATURES_FILE,
    INDEX_FILE,
    INFO_FILE,
    Engine,
    Transform,
    check_values,
    iter_features,
)
from imgclf.features.rows import RowReader

FORMAT = 1  # the layout of a shard; a new one never reads an old one
# The modules whose code turns a file into a backbone output, per kind of pass: a change in any is a new key.
CODE_MODULES = {
    "features": (
        "imgclf.core.repro",
        "imgclf.data.images",
        "imgclf.data.dicom",
        "imgclf.features.backbones",
        "imgclf.features.extractor",
        "imgclf.features.backbone_pass",
    ),
}
CODE_MODULES["augment"] = (*CODE_MODULES["features"], "imgclf.data.augment")
ENGINE_MODULES = ("imgclf.features.engine_ray",)  # the workers' decoding and padding
DECODERS = ("pillow", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg")
SWITCHES = ("TF_ENABLE_ONEDNN_OPTS", "TF_XLA_FLAGS", "TF_DETERMINISTIC_OPS", "OMP_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")  # fmt: skip


def model_digest(model: Any) -> str:
    """SHA-256 of a Keras model's architecture (its JSON config, which holds the layers' dtype policies) and of
    every weight's dtype, shape and bytes: two models with the same digest compute the same function."""
    digest = hashlib.sha256(model.to_json().encode())
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"{weight.path}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def code_digest(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode())
        digest.update(Path(inspect.getsourcefile(importlib.import_module(name)) or "").read_bytes())
    return digest.hexdigest()


def machine_record() -> dict[str, Any]:
    """device.platform_record plus what else on this machine can move the last bits: the CPUs this process may
    run on (oneDNN's results are reproducible for one thread count), TensorFlow's thread settings and switches,
    and the image decoders' versions."""
    import tensorflow as tf

    from imgclf.features.device import platform_record

    versions = {}
    for package in DECODERS:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        **platform_record(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": [
            tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads(),
        ],
        "switches": {name: os.environ.get(name) for name in SWITCHES},
        "decoders": versions,
    }


class OutputCache:
    """The stored outputs of one key: `where[item]` says where an item's output is, `commit` publishes a pass's
    new outputs, `read` reads them back in any order."""

    def __init__(self, root: str | Path, kind: str, record: dict[str, Any]) -> None:
        self.record = record
        self.machine = json.dumps(record.get("machine"), sort_keys=True, default=str)  # who computed its outputs
        key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]
        self.directory = Path(root).expanduser() / kind / key
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            key_file = self.directory / "key.json"
            tmp = key_file.with_name(f".{uuid.uuid4().hex}.tmp")  # also proves the folder writable
            tmp.write_text(json.dumps(record, sort_keys=True, indent=1, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, key_file)
        except OSError as exc:
            raise UserError(
                f"features.cache={str(root)!r} cannot hold the reusable outputs ({exc.strerror or exc}): set a "
                "writable folder, or null to reuse nothing"
            ) from None
        self.shards: list[Path] = []
        self.where: dict[str, tuple[int, int]] = {}  # item -> (shard number, row)
        for index_file in sorted(self.directory.glob("*.csv")):
            self._load(index_file)

    def _load(self, index_file: Path) -> None:
        """Add a shard, or skip it with a warning when its .npy does not hold one row per item of its .csv (a file
        damaged or cut short outside imgclf): its images are then computed again."""
        shard = index_file.with_suffix(".npy")
        try:
            items = pd.read_csv(index_file, dtype=str, keep_default_na=False).item.tolist()
            reader = RowReader(shard)
            complete = (
                len(reader) == len(items) and shard.stat().st_size == reader.offset + len(items) * reader.row_bytes
            )
            reader.close()
        except (OSError, ValueError, IndexError, AttributeError, pd.errors.ParserError) as exc:
            complete, items = False, []
            reason = str(exc)
        else:
            reason = "fewer or more rows than items"
        if not complete:
            log.warning("features.cache: ignoring the damaged shard %s (%s); its images are recomputed", shard, reason)
            return
        number = len(self.shards)
        self.shards.append(shard)
        for row, item in enumerate(items):
            self.where.setdefault(item, (number, row))

    def __contains__(self, item: str) -> bool:
        return item in self.where

    def new_shard(self) -> tuple[Path, Path]:
        """Paths to write a shard to (.npy first, then its .csv with `commit`)."""
        name = uuid.uuid4().hex
        return self.directory / f"{name}.npy", self.directory / f"{name}.csv"

    def commit(self, npy: Path, csv: Path, items: list[str]) -> None:
        """Publish a written shard: its .npy flushed to disk, then its index, atomically."""
        with open(npy, "rb+") as f:
            os.fsync(f.fileno())
        tmp = csv.with_name(f".{csv.name}.tmp")
        pd.DataFrame({"item": items}).to_csv(tmp, index=False, lineterminator="\n")
        os.replace(tmp, csv)
        self._load(csv)

    def read(self, items: list[str], block: int = 256) -> Iterator[np.ndarray]:
        """The stored outputs of `items`, in order, `block` rows at a time (each shard's rows gathered straight
        into the block: rows.RowReader.gather). A shard's file stays open only while its rows are read."""
        for start in range(0, len(items), block):
            where = np.array([self.where[item] for item in items[start : start + block]], dtype=np.int64)
            out = None
            for shard in np.unique(where[:, 0]).tolist():
                reader = RowReader(self.shards[shard])
                try:
                    if out is None:
                        out = np.empty((len(where), *reader.shape[1:]), dtype=reader.dtype)
                    mine = np.flatnonzero(where[:, 0] == shard)
                    reader.gather(where[mine, 1], out, mine)
                finally:
                    reader.close()
            yield out


def compute_features(
    extractor: Any,
    images: pd.DataFrame,
    root: str | Path,
    out_dir: str | Path,
    image_size: int,
    batch_size: int,
    info: dict[str, Any],
    recipe: ImageRecipe = DEFAULT_RECIPE,
    transform: Transform | None = None,
    desc: str | None = None,
    save_extractor: bool = True,
    threads: int = 1,
    engine: Engine | None = None,
    cache: str | Path | None = None,
    cache_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write features.npy (N, h, w, C) float32, index.csv (sha256, path, row), info.json and the
    extractor itself (extractor.keras: the end-to-end model must use the very backbone that made the
    features, which matters with random init) into out_dir.

    Only the images (rows: sha256, or sha256 and `variant`) whose output is not in the folder `cache` under the
    same key are computed (None: all, nothing kept); `cache_record` adds what else decides the outputs (the
    augmentation strengths and seed). The files written are the same bytes either way. Returns the info
    written, plus (not written) how many distinct items were `computed` and `reused`.

    The directory appears complete or not at all (built under a temporary name, then moved). With
    `transform`, image i is transformed after loading (augmented variants; see augment.py). With `engine`
    (e.g. engine_ray.ray_engine), the pass runs elsewhere from the saved extractor: the same batches, the
    same numbers.
    """
    shape = tuple(int(d) for d in extractor.output.shape[1:])
    paths = [Path(root) / p for p in images.path]
    items = list(images.sha256)
    if "variant" in images:
        items = [f"{sha}/{int(k)}" for sha, k in zip(images.sha256, images.variant, strict=True)]
    desc = desc or f"features@{info.get('backbone', '')}"
    precision = info.get("precision", "float32")
    if engine is not None and (transform is not None or not save_extractor):
        raise ValueError("an engine runs features@'s pass only (augmented variants run locally)")
    kind = "augment" if transform is not None else "features"
    # Without a cache, a store for this pass only (its key does not matter), named to match atomic_path's
    # leftovers pattern: a killed pass's is removed next time.
    # Made after atomic_path has made the output's folder (a fresh clone has none) and swept old leftovers.
    scratch_name = {"prefix": ".tmp-", "suffix": f"-{Path(out_dir).name}", "dir": Path(out_dir).parent}
    with (
        atomic_path(out_dir) as tmp,
        tempfile.TemporaryDirectory(**scratch_name) if cache is None else nullcontext("") as scratch,
    ):
        tmp.mkdir(parents=True)
        if cache is None:
            stores = {"": OutputCache(scratch, kind, {})}  # one store, whoever computes
            base: dict[str, Any] = {}
        else:
            modules = CODE_MODULES[kind] + (ENGINE_MODULES if engine is not None else ())
            base = {
                **(cache_record or {}),
                "format": FORMAT,
                "extractor": model_digest(extractor),
                "image_size": image_size,
                "batch_size": batch_size,  # the shape every batch runs at
                "recipe": recipe.to_dict(),
                "engine": "this process" if engine is None else "ray",
                "code": code_digest(modules),
            }  # fmt: skip
            # Keyed by the machine that computes: this one, or (Ray) each node type that can host a worker.
            here = [json.dumps(machine_record(), sort_keys=True, default=str)] if engine is None else engine.machines()
            stores = {m: OutputCache(cache, kind, {**base, "machine": json.loads(m)}) for m in here}
        owner: dict[str, OutputCache] = {}  # each stored item's store: the first (in sorted order) that has it
        for store in stores.values():
            for item in store.where:
                owner.setdefault(item, store)
        todo, seen = [], set()  # the first row of each item without a stored output
        for i, item in enumerate(items):
            if item not in owner and item not in seen:
                seen.add(item)
                todo.append(i)
        gone = [path for path, item in zip(paths, items, strict=True) if item in owner and not path.is_file()]
        if gone:  # a pass from scratch would stop on it (load_or_stop): so does one that reuses its output
            raise UserError(
                f"{gone[0]} can no longer be read (no such file; {len(gone)} listed images are missing); it was "
                "readable when prepare scanned data.root. Restore the file, or rerun prepare (`dvc repro -f prepare`)"
            )
        made_by = {owner[item].machine for item in set(items) if item in owner}  # the machine types of the rows
        if todo:
            new_items = [items[i] for i in todo]
            if engine is not None:  # its workers load the saved extractor: save it first
                save_keras(extractor, tmp / EXTRACTOR_FILE)
                computed = engine(tmp / EXTRACTOR_FILE, [paths[i] for i in todo], image_size, batch_size, recipe, desc)
                incoming = Path(cache or scratch).expanduser() / kind / f".incoming-{uuid.uuid4().hex}.npy"
                incoming.parent.mkdir(parents=True, exist_ok=True)
                try:
                    machines: list[str] = []  # who computed each row

                    def blocks() -> Iterator[np.ndarray]:
                        for block, who in computed:
                            machines.extend(who)
                            yield block

                    nonfinite, _ = write_rows(incoming, (len(todo), *shape), blocks(), desc)
                    if len(machines) != len(todo):
                        raise RuntimeError(
                            f"{desc}: the engine named a machine for {len(machines)} of {len(todo)} rows"
                        )
                    check_values(desc, nonfinite, 1, len(todo), precision)
                    made_by.update(machines)
                    for machine, rows in _rows_by(machines).items():
                        if cache is None:
                            store = stores[""]
                        elif machine in stores:
                            store = stores[machine]
                        else:  # a node that joined after the probe
                            store = stores[machine] = OutputCache(cache, kind, {**base, "machine": json.loads(machine)})
                        _store_rows(store, incoming, rows, [new_items[r] for r in rows], len(todo), desc)
                        owner.update((new_items[r], store) for r in rows if new_items[r] not in owner)
                finally:
                    incoming.unlink(missing_ok=True)
            else:
                subset = (lambda k, image: transform(todo[k], image)) if transform is not None else None
                outputs = iter_features(
                    extractor, [paths[i] for i in todo], image_size, batch_size, recipe, desc, subset, threads
                )
                (store,) = stores.values()
                made_by.add(store.machine)
                npy, csv = store.new_shard()
                try:
                    nonfinite, _ = write_rows(npy, (len(todo), *shape), outputs, desc)
                    check_values(desc, nonfinite, 1, len(todo), precision)  # never store NaN (zeros: checked below)
                    store.commit(npy, csv, new_items)
                finally:
                    if not csv.exists():
                        npy.unlink(missing_ok=True)
                owner.update((item, store) for item in new_items if item not in owner)
        if len(made_by) > 1:
            log.warning(
                "%s: its rows were computed on %d machine types (%s): the last bits of a row depend on its machine "
                "type, so this output is none of theirs alone; run the pass on nodes of one type (docs/scale.md)",
                desc, len(made_by), "; ".join(describe(json.loads(m)) for m in sorted(made_by)),
            )  # fmt: skip
        nonfinite, nonzero = write_rows(tmp / FEATURES_FILE, (len(paths), *shape), _read_owned(owner, items), desc)
        check_values(desc, nonfinite, nonzero, len(paths), precision)
        write_csv(images.assign(row=np.arange(len(images))), tmp / INDEX_FILE)
        info = {**info, "feature_shape": list(shape), "images": len(paths), "image_recipe": recipe.to_dict()}
        write_json(tmp / INFO_FILE, info)
        if save_extractor:
            record = {k: info[k] for k in EXTRACTOR_KEYS if k in info}
            write_json(tmp / EXTRACTOR_INFO_FILE, {**record, "feature_shape": list(shape)})
            if not (tmp / EXTRACTOR_FILE).exists():
                save_keras(extractor, tmp / EXTRACTOR_FILE)
    return {**info, "computed": len(todo), "reused": len(set(items)) - len(todo)}


def describe(machine: dict[str, Any] | None) -> str:
    """A machine record in a few words: vendor, the kernel-selecting CPU flags, GPUs."""
    machine = machine or {}
    gpus = f", {', '.join(machine['gpus'])}" if machine.get("gpus") else ""
    return f"{machine.get('cpu_vendor')} {'+'.join(machine.get('cpu_flags', [])[-3:]) or 'no listed flags'}{gpus}"


def _rows_by(machines: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for row, machine in enumerate(machines):
        out.setdefault(machine, []).append(row)
    return out


def _store_rows(store: OutputCache, incoming: Path, rows: list[int], items: list[str], total: int, desc: str) -> None:
    """Publish rows of the pass's output file as a shard of `store`: the file itself when it is all of them."""
    npy, csv = store.new_shard()
    try:
        if len(rows) == total:
            os.replace(incoming, npy)
        else:
            reader = RowReader(incoming)

            def blocks() -> Iterator[np.ndarray]:
                for start in range(0, len(rows), 256):
                    chosen = np.asarray(rows[start : start + 256], dtype=np.int64)
                    out = np.empty((len(chosen), *reader.shape[1:]), dtype=reader.dtype)
                    reader.gather(chosen, out, np.arange(len(chosen)))
                    yield out

            try:
                write_rows(npy, (len(rows), *reader.shape[1:]), blocks(), desc)
            finally:
                reader.close()
        store.commit(npy, csv, items)
    finally:
        if not csv.exists():
            npy.unlink(missing_ok=True)


def _read_owned(owner: dict[str, OutputCache], items: list[str], block: int = 256) -> Iterator[np.ndarray]:
    """The stored outputs of `items` in order, each from its owner store, `block` rows at a time."""
    stores = {id(owner[item]): owner[item] for item in items}
    if len(stores) <= 1:
        yield from next(iter(stores.values())).read(items, block) if stores else iter(())
        return
    for start in range(0, len(items), block):
        chunk = items[start : start + block]
        out = None
        for key, store in stores.items():
            mine = [k for k, item in enumerate(chunk) if id(owner[item]) == key]
            if not mine:
                continue
            part = next(store.read([chunk[k] for k in mine], block=len(mine)))
            if out is None:
                out = np.empty((len(chunk), *part.shape[1:]), dtype=part.dtype)
            out[mine] = part
        yield out


def write_rows(path: Path, shape: tuple[int, ...], blocks: Iterator[np.ndarray], desc: str) -> tuple[int, int]:
    """A plain .npy of `shape` float32 written block by block (resident memory stays one block, whatever the
    dataset size; a writable memmap would keep every written page in the process's resident set). Returns how
    many values are not finite and how many are not zero (for check_values)."""
    nonfinite, nonzero, written = 0, 0, 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for block in blocks:
            nonfinite += int(np.count_nonzero(~np.isfinite(block)))
            nonzero += int(np.count_nonzero(block))
            written += len(block)
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
    if written != shape[0]:
        raise RuntimeError(f"{desc}: {written} rows computed for {shape[0]} images")
    return nonfinite, nonzero
