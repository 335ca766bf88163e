"""Near-copies are confirmed pairs, and the guarantee holds pair by pair: on a Training/Testing folder with
re-exports planted in it, whatever the files are called, the same pairs are confirmed, no confirmed pair has its
images in two splits, a re-export of a test image is held out of training, a re-export of a training image
shares its original's split, and a copy elsewhere never changes the provided test folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_dataset, shape_image
from PIL import Image, ImageEnhance

from imgclf.data.groups import group_confirmed, linked_splits, near_duplicate_pairs, resolve_conflicts
from imgclf.data.scan import scan_folder
from imgclf.data.split import HELD_OUT, held_out, split_manifest

CORRELATION = 0.99  # params.yaml's default


def re_export(path: Path, target: Path, kind: int) -> None:
    """The picture at `path` written again as a user's tools would: JPEG, resized, brighter, 16-bit."""
    im = Image.open(path).convert("L")
    if kind == 0:
        im.resize((50, 50), Image.Resampling.BICUBIC).save(target.with_suffix(".jpg"), quality=85)
    elif kind == 1:
        ImageEnhance.Brightness(im).enhance(1.04).save(target.with_suffix(".png"))
    elif kind == 2:
        Image.fromarray(np.asarray(im, dtype=np.uint16) * 257).save(target.with_suffix(".png"))
    else:
        buf = io.BytesIO()
        im.resize((30, 30), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
        target.with_suffix(".jpg").write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    """Distinct shapes (vary) and look-alike shapes (the same shape, other noise), Training and Testing, plus
    re-exports of 6 test images in Training and of 6 training images beside their originals."""
    root = tmp_path_factory.mktemp("near") / "root"
    counts = {"hbar": 14, "vbar": 14, "ring": 14}
    make_dataset(root / "Training", counts, size=40, vary=True)
    make_dataset(root / "Testing", {k: 5 for k in counts}, size=40, vary=True, seed=1)
    rng = np.random.default_rng(5)
    for i in range(12):  # look-alikes: rings that differ in noise and a 2-pixel shift (about 20 candidate pairs)
        Image.fromarray(shape_image(3, 40, rng)).save(root / "Training/ring" / f"alike_{i:03d}.png")
    plants: dict[str, list[tuple[str, str]]] = {"test": [], "train": []}
    for kind, folder in (("test", "Testing"), ("train", "Training")):
        for k, label in enumerate(["hbar", "vbar", "ring"] * 2):
            original = f"{folder}/{label}/{label}_{k // 3 + 1:03d}.png"
            target = root / "Training" / label / f"copy_of_{kind}_{k}"
            re_export(root / original, target, k % 4)
            (copy,) = root.glob(f"Training/{label}/copy_of_{kind}_{k}.*")
            plants[kind].append((original, copy.relative_to(root).as_posix()))
    return root, plants


def prepare_like(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What `prepare` does with data.near_duplicates: group: the manifest (groups, links) and the pairs."""
    thumbnails: dict = {}
    manifest, _ = resolve_conflicts(scan_folder(root, thumbnails=thumbnails), "skip")
    near = near_duplicate_pairs(manifest, 4, thumbnails, CORRELATION)
    manifest = group_confirmed(manifest, near)
    ok = manifest.status == "ok"
    manifest["linked_to"] = ""
    manifest.loc[ok, "linked_to"] = linked_splits(manifest, near, None)
    return manifest, near.frame()


def renamed(root: Path, target: Path, rng: np.random.Generator) -> dict[str, str]:
    """A copy of `root` with every file given a new random name in its folder; new path -> old path."""
    back = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        new = rel.parent / f"{rng.integers(10**9):09d}{path.suffix}"
        (target / new).parent.mkdir(parents=True, exist_ok=True)
        (target / new).write_bytes(path.read_bytes())
        back[new.as_posix()] = rel.as_posix()
    return back


def homes(splits: dict[str, pd.DataFrame], manifest: pd.DataFrame) -> dict[str, str]:
    home = {p: name for name, frame in splits.items() for p in frame.path}
    return {p: home.get(p, HELD_OUT) for p in manifest[manifest.status == "ok"].path}


def test_the_same_pairs_are_confirmed_under_any_names_and_none_crosses_splits(planted, tmp_path: Path) -> None:
    root, plants = planted
    rng = np.random.default_rng(0)
    reference = None
    for trial in range(4):
        if trial:
            back = renamed(root, tmp_path / f"names{trial}", rng)
            manifest, pairs = prepare_like(tmp_path / f"names{trial}")
        else:
            back = {p: p for p in (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())}
            manifest, pairs = prepare_like(root)
        confirmed = pairs[pairs.confirmed]
        found = frozenset(
            frozenset((back[a], back[b])) for a, b in zip(confirmed.path_a, confirmed.path_b, strict=True)
        )
        reference = reference or found
        assert found == reference, f"renaming #{trial} changed the confirmed pairs"
        assert (~pairs.confirmed).sum() >= 3, "the look-alike rings must be candidates the confirmation rejects"
        for provided in (True, False):
            splits = split_manifest(manifest, val=0.2, test=0.2, seed=trial, use_provided_splits=provided)
            home = homes(splits, manifest)
            for a, b in zip(confirmed.path_a, confirmed.path_b, strict=True):
                assert HELD_OUT in (home[a], home[b]) or home[a] == home[b], (back[a], back[b], home[a], home[b])
            old_home = {back[p]: h for p, h in home.items()}
            for original, copy in plants["train"]:
                assert old_home[copy] == old_home[original], (copy, original)
            if provided:
                assert sorted(back[p] for p in splits["test"].path) == sorted(
                    p for p in reference_paths(root) if p.startswith("Testing/")
                ), "the provided test folder changed"
                held = {back[p] for p in held_out(manifest, splits).path}
                assert held == {copy for _, copy in plants["test"]}  # every re-export of a test image, no look-alike
    expected = {frozenset(pair) for pair in plants["test"] + plants["train"]}
    assert expected <= reference, sorted(map(sorted, expected - reference))


def reference_paths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_copy_of_a_test_image_under_another_class_leaves_the_test_folder_intact(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_dataset(root / "Training", {"a": 8, "b": 8}, vary=True)
    make_dataset(root / "Testing", {"a": 3, "b": 3}, vary=True, seed=1)
    make_dataset(root / "Validation", {"a": 3, "b": 3}, vary=True, seed=2)
    test_image = root / "Testing/a/a_000.png"
    val_image = root / "Validation/b/b_001.png"
    (root / "Training/b/copy_of_a_test_image.png").write_bytes(test_image.read_bytes())
    (root / "Training/a/copy_of_a_val_image.png").write_bytes(val_image.read_bytes())
    (root / "Training/b/another.png").write_bytes(test_image.read_bytes())
    for rule in ("skip", "majority"):  # majority: 2 training copies under b outvote the test image's a
        manifest, report = resolve_conflicts(scan_folder(root), rule)
        status = manifest.set_index("path").status
        assert (manifest[manifest.provided_split == "test"].status == "ok").all(), rule
        assert status["Validation/b/b_001.png"] == "ok"
        for copy in (
            "Training/b/copy_of_a_test_image.png",
            "Training/b/another.png",
            "Training/a/copy_of_a_val_image.png",
        ):
            assert status[copy] == "skipped", (rule, copy)
        assert report.kept.sum() == 2 and len(report) == 5
        reason = manifest.set_index("path").reason["Training/b/another.png"]
        assert "provided test folder, kept as given" in reason
    # data.use_provided_splits: false: the folders are just data, and the rule decides for every copy
    manifest, report = resolve_conflicts(scan_folder(root), "skip", provided_wins=False)
    assert manifest.set_index("path").status["Testing/a/a_000.png"] == "skipped" and not report.kept.any()
