"""A backbone pass reuses the outputs it has (features.cache) and writes the bytes a from-scratch pass writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest
from helpers import make_dataset

from imgclf.data.augment import AugmentParams, make_variant
from imgclf.data.images import ImageRecipe
from imgclf.features.backbone_pass import FEATURES_FILE, INDEX_FILE, INFO_FILE, predict_padded
from imgclf.features.reuse import compute_features

SIZE, BATCH = 32, 4


def extractor(seed: int = 0) -> Any:
    from imgclf.features.backbones import build_backbone, get_backbone
    from imgclf.features.extractor import build_extractor

    keras.utils.set_random_seed(seed)
    model, _ = build_backbone(get_backbone("mobilenet"), SIZE, "none")
    return build_extractor(model, "mobilenet", SIZE, "backbone")


@pytest.fixture(scope="module")
def mobilenet() -> Any:
    return extractor()


def image_list(root: Path) -> pd.DataFrame:
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    sha = [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths]
    return pd.DataFrame({"sha256": sha, "path": paths})


def run(model: Any, images: pd.DataFrame, root: Path, out: Path, **kwargs: Any) -> dict[str, Any]:
    info = {"backbone": "mobilenet", "image_size": SIZE, "precision": "float32"}
    return compute_features(model, images, root, out, SIZE, BATCH, info, **kwargs)


def output_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (FEATURES_FILE, INDEX_FILE, INFO_FILE)}


def test_an_image_gets_the_same_bits_in_any_batch(mobilenet: Any) -> None:
    """Padded to one shape, a batch's outputs do not depend on the other images or the position: the premise of
    reuse. (Unpadded, MobileNet's outputs move in the last bits with the batch's length on x86 CPUs.)"""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (7, SIZE, SIZE, 3)).astype(np.float32)
    alone = predict_padded(mobilenet, images[[0]], BATCH)  # padded with three black images
    with_mates = predict_padded(mobilenet, images[[1, 2, 0]], BATCH)  # other mates, third position
    full = predict_padded(mobilenet, images[[3, 4, 5, 0]], BATCH)  # a full batch, last position
    assert np.array_equal(alone[0], with_mates[2]) and np.array_equal(alone[0], full[3])
    assert with_mates.shape == (3, *alone.shape[1:])


def test_adding_and_removing_images_reuses_the_rest_and_writes_scratch_bytes(mobilenet: Any, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "images", {"a": 7, "b": 6}, size=40)
    everything = image_list(root)
    first = everything.iloc[:9].reset_index(drop=True)  # 9 images: batches of 4, 4 and a padded 1
    cache = tmp_path / "cache"
    done = run(mobilenet, first, root, tmp_path / "first", cache=cache)
    assert (done["computed"], done["reused"]) == (9, 0)

    # Add 4 images and remove 2: only the 4 are computed, in a batch of their own.
    second = pd.concat([first.drop(index=[1, 5]), everything.iloc[9:]], ignore_index=True)
    done = run(mobilenet, second, root, tmp_path / "incremental", cache=cache)
    assert (done["computed"], done["reused"]) == (4, 7)
    run(mobilenet, second, root, tmp_path / "scratch")  # no cache: everything computed, in other batches
    assert output_bytes(tmp_path / "incremental") == output_bytes(tmp_path / "scratch")
    index = pd.read_csv(tmp_path / "incremental" / INDEX_FILE, dtype=str)
    assert not set(first.path[[1, 5]]) & set(index.path)  # removed images are gone from the output

    # The same list again: nothing computed; a repeated row (an image listed twice) reads one output twice.
    again = pd.concat([second, second.iloc[[0]]], ignore_index=True)
    done = run(mobilenet, again, root, tmp_path / "again", cache=cache)
    assert (done["computed"], done["reused"]) == (0, 11)
    features = np.load(tmp_path / "again" / FEATURES_FILE)
    assert np.array_equal(features[-1], features[0])


def test_a_changed_recipe_or_weight_reuses_nothing(mobilenet: Any, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "images", {"a": 3, "b": 3}, size=40)
    images = image_list(root)
    cache = tmp_path / "cache"
    assert run(mobilenet, images, root, tmp_path / "base", cache=cache)["computed"] == 6
    recipe = dataclasses.replace(ImageRecipe(), window=(1.0, 99.0))
    assert run(mobilenet, images, root, tmp_path / "recipe", cache=cache, recipe=recipe)["computed"] == 6
    kernel = next(w for w in mobilenet.weights if w.path.endswith("kernel"))
    original = kernel.numpy()
    try:  # one weight moved by a hair: the same architecture and names, other numbers
        kernel.assign(original + np.float32(1e-6) * (np.arange(original.size) == 0).reshape(original.shape))
        assert run(mobilenet, images, root, tmp_path / "weights", cache=cache)["computed"] == 6
    finally:
        kernel.assign(original)
    assert run(mobilenet, images, root, tmp_path / "same", cache=cache)["computed"] == 0
    assert output_bytes(tmp_path / "same") == output_bytes(tmp_path / "base")
    assert len(list((cache / "features").iterdir())) == 3  # one key each: base, recipe, weights


def test_augmented_variants_of_unchanged_images_are_reused(mobilenet: Any, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "images", {"a": 4, "b": 3}, size=40)
    images = image_list(root)
    augment = AugmentParams.from_params(
        {"copies": 2, "flip": True, "rotation": 10, "zoom": 0.1, "translation": 0.1, "brightness": 0.1, "contrast": 0.1}
    )

    def variants(frame: pd.DataFrame, out: Path, cache: Path | None, seed: int = 0) -> dict[str, Any]:
        rows = frame.loc[np.repeat(np.arange(len(frame)), 2)].reset_index(drop=True)
        rows = rows.assign(variant=np.tile([1, 2], len(frame)))
        return run(
            mobilenet, rows, root, out, cache=cache, cache_record={"strengths": augment.rotation, "seed": seed},
            transform=lambda i, image: make_variant(image, seed, rows.sha256[i], int(rows.variant[i]), augment),
            save_extractor=False,
        )  # fmt: skip

    cache = tmp_path / "cache"
    assert variants(images.iloc[:5], tmp_path / "first", cache)["computed"] == 10
    done = variants(images, tmp_path / "incremental", cache)
    assert (done["computed"], done["reused"]) == (4, 10)
    variants(images, tmp_path / "scratch", None)
    assert output_bytes(tmp_path / "incremental") == output_bytes(tmp_path / "scratch")
    assert variants(images, tmp_path / "other_seed", cache, seed=1)["computed"] == 14  # other pixels, no reuse


def test_an_interrupted_pass_leaves_no_usable_shard(mobilenet: Any, tmp_path: Path) -> None:
    """A pass stopped part-way (an unreadable image) stores nothing, and the next pass computes everything."""
    from imgclf.core.errors import UserError

    root = make_dataset(tmp_path / "images", {"a": 3, "b": 3}, size=40)
    images = image_list(root)
    (root / images.path[4]).write_bytes(b"not a png")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="can no longer be read"):
        run(mobilenet, images, root, tmp_path / "out", cache=cache)
    assert not list(cache.rglob("*.npy")) and not list(cache.rglob("*.csv"))
    assert not (tmp_path / "out").exists()
    assert run(mobilenet, images.drop(index=4), root, tmp_path / "out", cache=cache)["computed"] == 5


def test_a_damaged_shard_is_ignored_and_an_unusable_folder_is_one_line(mobilenet: Any, tmp_path: Path) -> None:
    from imgclf.core.errors import UserError

    root = make_dataset(tmp_path / "images", {"a": 2, "b": 2}, size=40)
    images = image_list(root)
    cache = tmp_path / "cache"
    run(mobilenet, images, root, tmp_path / "first", cache=cache)
    (shard,) = cache.rglob("*.npy")
    shard.write_bytes(shard.read_bytes()[:-100])  # cut short outside imgclf, its index still there
    assert run(mobilenet, images, root, tmp_path / "second", cache=cache)["computed"] == 4  # ignored, recomputed
    assert output_bytes(tmp_path / "second") == output_bytes(tmp_path / "first")

    (tmp_path / "a file").write_text("not a folder")
    with pytest.raises(UserError, match=r"features.cache=.*a file.* cannot hold the reusable outputs"):
        run(mobilenet, images, root, tmp_path / "third", cache=tmp_path / "a file")


def test_a_reused_image_whose_file_is_gone_stops_as_a_pass_from_scratch_would(mobilenet: Any, tmp_path: Path) -> None:
    from imgclf.core.errors import UserError

    root = make_dataset(tmp_path / "images", {"a": 2, "b": 2}, size=40)
    images = image_list(root)
    cache = tmp_path / "cache"
    run(mobilenet, images, root, tmp_path / "first", cache=cache)
    (root / images.path[2]).unlink()
    with pytest.raises(UserError, match=r"can no longer be read \(no such file; 1 listed images are missing\)"):
        run(mobilenet, images, root, tmp_path / "second", cache=cache)


def test_no_cache_on_a_fresh_clone_writes_the_bytes_of_a_pass_with_one(mobilenet: Any, tmp_path: Path) -> None:
    """features.cache: null where the output's folder does not exist yet (a fresh clone has no data/features/):
    the scratch store is made beside the output once that folder exists (it failed with FileNotFoundError)."""
    root = make_dataset(tmp_path / "images", {"a": 3, "b": 3}, size=40)
    images = image_list(root)
    fresh = tmp_path / "clone" / "data" / "features" / "mobilenet"
    assert run(mobilenet, images, root, fresh)["computed"] == 6
    run(mobilenet, images, root, tmp_path / "cached", cache=tmp_path / "cache")
    assert output_bytes(fresh) == output_bytes(tmp_path / "cached")
    assert [p.name for p in fresh.parent.iterdir()] == ["mobilenet"]  # no scratch store left beside it


class TwoMachineEngine:
    """An engine standing in for a Ray cluster of two node types: it computes here, at the local pass's shapes,
    and says that the rows of every other batch came from machine "B"."""

    def __init__(self, model: Any, nodes: list[str]) -> None:
        self.model, self.nodes = model, nodes

    def machines(self) -> list[str]:
        return [json.dumps({"cpu_vendor": node, "cpu_flags": []}, sort_keys=True) for node in self.nodes]

    def __call__(self, model_file, paths, image_size, batch_size, recipe, desc):
        from imgclf.features.backbone_pass import iter_features

        for k, block in enumerate(iter_features(self.model, paths, image_size, batch_size, recipe, desc)):
            node = self.nodes[k % len(self.nodes)]
            yield block, [json.dumps({"cpu_vendor": node, "cpu_flags": []}, sort_keys=True)] * len(block)


def test_each_rows_output_is_keyed_by_the_machine_that_computed_it(mobilenet: Any, tmp_path: Path, caplog) -> None:
    """Issue 33: with Ray the key held the driver's machine record, so a node of another type joining changed
    the bits but not the key. Now each row is stored under its worker's record, a pass reuses only the node
    types its cluster has, and a pass mixing types warns."""
    root = make_dataset(tmp_path / "images", {"a": 5, "b": 5}, size=40)
    images = image_list(root)
    cache = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="imgclf"):
        done = run(
            mobilenet, images, root, tmp_path / "mixed", cache=cache, engine=TwoMachineEngine(mobilenet, ["A", "B"])
        )
    assert done["computed"] == 10
    assert any("computed on 2 machine types (A no listed flags; B" in r.message for r in caplog.records)
    keys = [json.loads((d / "key.json").read_text())["machine"]["cpu_vendor"] for d in (cache / "features").iterdir()]
    assert sorted(keys) == ["A", "B"]  # batches 1 and 3 (6 rows) under A, batch 2 (4 rows) under B
    run(mobilenet, images, root, tmp_path / "here")  # the same bytes as a local pass
    assert output_bytes(tmp_path / "mixed")[FEATURES_FILE] == output_bytes(tmp_path / "here")[FEATURES_FILE]
    # A cluster of A nodes only: B's rows are not reused (its bits are B's), they are computed on A.
    only_a = TwoMachineEngine(mobilenet, ["A"])
    done = run(mobilenet, images, root, tmp_path / "only_a", cache=cache, engine=only_a)
    assert (done["computed"], done["reused"]) == (4, 6)
    done = run(mobilenet, images, root, tmp_path / "again", cache=cache, engine=only_a)
    assert (done["computed"], done["reused"]) == (0, 10)
    caplog.clear()  # without a cache a mixed pass warns all the same
    with caplog.at_level("WARNING", logger="imgclf"):
        run(mobilenet, images, root, tmp_path / "nocache", engine=TwoMachineEngine(mobilenet, ["A", "B"]))
    assert any("computed on 2 machine types" in r.message for r in caplog.records)
    assert output_bytes(tmp_path / "nocache")[FEATURES_FILE] == output_bytes(tmp_path / "here")[FEATURES_FILE]


def test_where_a_gpu_runs_its_cuda_cudnn_cublas_and_driver_versions_are_in_the_key(monkeypatch, tmp_path: Path) -> None:
    import tensorflow as tf

    from imgclf.features import device
    from imgclf.features.reuse import OutputCache, machine_record

    if not device.visible_gpus():  # no GPU: the record (and every result holding it) as before
        assert "gpu_stack" not in machine_record()
    monkeypatch.setattr(device, "visible_gpus", lambda: [type("GPU", (), {"name": "/physical_device:GPU:0"})()])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda d: {"device_name": "NVIDIA T4"})
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n")
    monkeypatch.setattr(device, "NVIDIA_DRIVER_FILE", driver)
    versions = {"nvidia-cudnn-cu12": "9.1.0.70", "nvidia-cublas-cu12": "12.4.5.8"}
    monkeypatch.setattr(device, "_library_version", lambda wheel, sonames, function: versions[wheel])
    record = machine_record()
    assert record["gpus"] == ["NVIDIA T4"]
    assert {k: record["gpu_stack"][k] for k in ("cudnn", "cublas", "driver")} == {
        "cudnn": "9.1.0.70", "cublas": "12.4.5.8", "driver": "550.54.14"
    }  # fmt: skip
    first = OutputCache(tmp_path / "cache", "features", {"machine": record}).directory
    versions["nvidia-cudnn-cu12"] = "9.3.0.75"  # another cuDNN picks other kernels: another key
    assert OutputCache(tmp_path / "cache", "features", {"machine": machine_record()}).directory != first
