"""split is stratified and never shares content between splits; balance equalises train only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers import dvc, make_dataset, make_project, update_params

from imgclf.core.errors import UserError
from imgclf.core.io import read_csv
from imgclf.data.groups import resolve_conflicts
from imgclf.data.scan import class_counts, scan_folder
from imgclf.data.split import balance_train, held_out, split_manifest

COUNTS = {"a": 60, "b": 30, "c": 20}


@pytest.fixture
def manifest(tmp_path: Path) -> pd.DataFrame:
    root = make_dataset(tmp_path / "d", COUNTS)
    for i in range(5):  # exact duplicates under one label must stay together
        (root / "a" / f"dup_{i}.png").write_bytes((root / "a" / f"a_{i:03d}.png").read_bytes())
    return scan_folder(root)


def test_split_is_stratified_and_shares_no_content(manifest: pd.DataFrame) -> None:
    splits = split_manifest(manifest, val=0.2, test=0.2, seed=3)
    hashes = {name: set(df.sha256) for name, df in splits.items()}
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    assert sum(len(df) for df in splits.values()) == (manifest.status == "ok").sum()
    for label, n in COUNTS.items():
        for name, frac in (("val", 0.2), ("test", 0.2)):
            got = (splits[name].label == label).sum()
            assert abs(got - n * frac) <= 3, (label, name, got)  # duplicates move whole groups


def test_split_is_repeatable_and_seeded(manifest: pd.DataFrame) -> None:
    first = split_manifest(manifest, 0.2, 0.2, seed=3)
    again = split_manifest(manifest, 0.2, 0.2, seed=3)
    other = split_manifest(manifest, 0.2, 0.2, seed=4)
    assert all(first[k].equals(again[k]) for k in first)
    assert not first["test"].path.equals(other["test"].path)


def test_class_too_small_names_class_count_and_minimum(tmp_path: Path) -> None:
    manifest = scan_folder(make_dataset(tmp_path / "d", {"big": 20, "rare": 2}))
    with pytest.raises(UserError, match=r"class 'rare' has 2 unique image\(s\).*at least 4"):
        split_manifest(manifest, val=0.15, test=0.15, seed=0)


def test_provided_test_folder_is_kept_exactly_and_its_copies_are_held_out_of_training(tmp_path: Path) -> None:
    root = tmp_path / "mri"
    make_dataset(root / "Training", {"glioma": 20, "notumor": 20})
    make_dataset(root / "Testing", {"glioma": 5, "notumor": 5}, seed=1)
    leaked = root / "Training" / "glioma" / "leaked.png"
    leaked.write_bytes((root / "Testing" / "glioma" / "glioma_000.png").read_bytes())
    manifest, _ = resolve_conflicts(scan_folder(root), "skip")
    # A near-copy group (as prepare forms them) that joins a training image to a test image.
    manifest.loc[manifest.path == "Training/notumor/notumor_003.png", "group"] = manifest.loc[
        manifest.path == "Testing/notumor/notumor_002.png", "group"
    ].item()
    splits = split_manifest(manifest, val=0.2, test=0.2, seed=0, use_provided_splits=True)
    testing = set(manifest.path[(manifest.provided_split == "test") & (manifest.status == "ok")])
    assert set(splits["test"].path) == testing and len(testing) == 10  # the official test set, unchanged
    held = held_out(manifest, splits)
    assert list(held.path) == ["Training/glioma/leaked.png", "Training/notumor/notumor_003.png"]
    assert held.reason.str.contains("provided test folder").all()
    assert not any(set(held.path) & set(df.path) for df in splits.values())
    assert set(splits["train"].provided_split) == set(splits["val"].provided_split) == {"train"}
    pooled = split_manifest(manifest, val=0.2, test=0.2, seed=0, use_provided_splits=False)
    assert abs(len(pooled["test"]) - 0.2 * 51) <= 2  # everything pooled, then split by the ratios
    assert sum(len(df) for df in pooled.values()) == 51  # 50 made + the leaked copy
    assert held_out(manifest, pooled).empty


def test_balance_equalises_train_only(manifest: pd.DataFrame) -> None:
    splits = split_manifest(manifest, 0.2, 0.2, seed=3)
    balanced = balance_train(splits["train"], "random_over", seed=3)
    counts = class_counts(balanced)
    assert len(set(counts.values())) == 1
    assert max(counts.values()) == max(class_counts(splits["train"]).values())
    assert set(balanced.path) == set(splits["train"].path)  # only copies of training rows
    assert balance_train(splits["train"], "none", seed=3).equals(splits["train"])


@pytest.mark.slow
def test_dvc_repro_data_stages_end_to_end(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    make_dataset(project / "images", {"a": 20, "b": 12, "c": 8})
    (project / "images" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # One small backbone: balance reads label_issues, which reads cv@ and so features@ of every backbone.
    update_params(project, {"data.root": "images", "backbones": ["mobilenet"], "features.image_size": 32,
                            "features.precision_overrides": {"mobilenet": None},
                            "train.overrides": {"mobilenet": {}}})  # fmt: skip
    result = dvc(project, "repro", "balance", "eda")
    assert "found 41 files: kept 40, skipped 1" in result.stderr + result.stdout
    manifest = pd.read_csv(project / "data/prepared/manifest.csv", keep_default_na=False)
    assert len(manifest) == 41
    balanced = pd.read_csv(project / "data/balanced/train.csv")
    assert len(set(class_counts(balanced).values())) == 1
    test = read_csv(project / "data/split/test.csv")
    assert class_counts(test) == {"a": 3, "b": 2, "c": 1}  # 15% of 20/12/8 rounded: the true, imbalanced mix
    assert (project / "metrics/data.json").is_file()
    for name in ("class_counts.png", "class_pie.png", "samples.png", "class_counts.csv"):
        assert (project / "plots/eda" / name).stat().st_size > 0
    assert "Data and pipelines are up to date" in dvc(project, "status", "balance", "eda").stdout


def test_a_file_in_both_validation_and_test_folders_is_kept_in_test_only(tmp_path: Path) -> None:
    root = tmp_path / "mri"
    make_dataset(root / "Training", {"glioma": 12, "notumor": 12})
    make_dataset(root / "Validation", {"glioma": 4, "notumor": 4}, seed=1)
    make_dataset(root / "Testing", {"glioma": 4, "notumor": 4}, seed=2)
    twin = (root / "Testing" / "notumor" / "notumor_001.png").read_bytes()
    (root / "Validation" / "notumor" / "twin.png").write_bytes(twin)
    (root / "Training" / "notumor" / "twin.png").write_bytes(twin)
    manifest = scan_folder(root)
    splits = split_manifest(manifest, val=0.2, test=0.2, seed=0, use_provided_splits=True)
    where = {name: set(df.path) for name, df in splits.items()}
    assert where["test"] == {p for p in manifest.path if p.startswith("Testing/")}  # as given
    assert where["val"] == {p for p in manifest.path if p.startswith("Validation/")} - {"Validation/notumor/twin.png"}
    assert list(held_out(manifest, splits).path) == ["Training/notumor/twin.png", "Validation/notumor/twin.png"]
    hashes = {name: set(df.sha256) for name, df in splits.items()}
    assert not (hashes["val"] & hashes["test"] or hashes["train"] & hashes["test"] or hashes["train"] & hashes["val"])


def test_a_class_in_validation_but_not_in_train_is_named(tmp_path: Path) -> None:
    root = tmp_path / "mri"
    make_dataset(root / "Training", {"glioma": 12, "notumor": 12})
    make_dataset(root / "Validation", {"glioma": 3, "notumor": 3, "pituitary": 3}, seed=1)
    make_dataset(root / "Testing", {"glioma": 3, "notumor": 3}, seed=2)
    with pytest.raises(UserError, match="class\\(es\\) 'pituitary' appear in val but not in train"):
        split_manifest(scan_folder(root), val=0.2, test=0.2, seed=0)
