"""prepare: every file found is accounted for; hostile files get the expected status and reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import HOSTILE, make_dataset

from imgclf.core.errors import UserError
from imgclf.data.groups import resolve_conflicts
from imgclf.data.images import ImageRecipe, load_image
from imgclf.data.scan import ScanOptions, check_classes, scan_folder, summary_line

# 200x200 = 40,000 pixels, over 2x the limit: a "bomb"
OPTIONS = ScanOptions(min_side=16, recipe=ImageRecipe(max_pixels=10_000))


@pytest.fixture
def hostile_root(tmp_path: Path) -> Path:
    root = tmp_path / "hostile"
    for name, (factory, _, _) in HOSTILE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(factory())
    os.symlink(root / "cat", root / "cat" / "loop")  # a symlink loop must not hang the scan
    return root


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_gets_expected_status(hostile_root: Path, name: str) -> None:
    manifest = scan_folder(hostile_root, OPTIONS).set_index("path")
    _, status, reason = HOSTILE[name]
    assert manifest.loc[name, "status"] == status, manifest.loc[name, "reason"]
    assert reason in manifest.loc[name, "reason"]


def test_every_file_is_accounted_for(hostile_root: Path) -> None:
    manifest = scan_folder(hostile_root, OPTIONS)
    # Counted from the disk, independently of the scanner (the loop is a symlink back to cat/: not new files).
    on_disk = {p.relative_to(hostile_root).as_posix() for p in hostile_root.rglob("*") if p.is_file()}
    on_disk = {p for p in on_disk if "/loop/" not in p}
    assert set(manifest.path) == on_disk and len(manifest) == len(on_disk) == len(HOSTILE)
    expected_kept = sum(1 for _, status, _ in HOSTILE.values() if status == "ok")
    assert summary_line(manifest).startswith(
        f"found {len(HOSTILE)} files: kept {expected_kept}, skipped {len(HOSTILE) - expected_kept}"
    )


def test_unusual_images_load_correctly_as_rgb(hostile_root: Path) -> None:
    load = lambda name: load_image(hostile_root / name, 24)  # noqa: E731
    assert load("cat/rgba.png")[0, 0].tolist() == [255, 255, 255]  # transparent -> white background
    full_range = ImageRecipe(high_bit_depth="full_range")
    assert load_image(hostile_root / "cat/gray16.png", 24, full_range)[1, 1].tolist() == [128, 128, 128]  # 32768/65535
    assert load("cat/gray16.png")[0, 0].tolist() == [255, 255, 255]  # window: the brightest pixel is white
    assert np.abs(load("cat/cmyk.jpg")[5, 5] - [200, 30, 60]).max() < 12  # CMYK -> the original colour
    assert load("cat/ñandú été 猫.png").shape == (24, 24, 3)
    manifest = scan_folder(hostile_root, OPTIONS).set_index("path")
    assert manifest.loc["cat/rotated.jpg", ["width", "height"]].tolist() == [20, 40]  # EXIF orientation applied
    assert manifest.loc["cat/cmyk.jpg", "mode"] == "CMYK"
    assert manifest.loc["cat/gray16.png", "mode"].startswith("I")


def test_label_conflict_skip_rule_and_same_label_duplicates(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", {"a": 3, "b": 3})
    same = (root / "a" / "a_000.png").read_bytes()
    (root / "b" / "copy_of_a.png").write_bytes(same)  # conflict: same content under a and b
    (root / "a" / "dup.png").write_bytes(same)  # same label: fine
    manifest, report = resolve_conflicts(scan_folder(root), "skip")
    conflicted = manifest[manifest.reason.str.startswith("label conflict")]
    assert sorted(conflicted.path) == ["a/a_000.png", "a/dup.png", "b/copy_of_a.png"]
    assert len(report) == 3 and not report.kept.any()

    manifest, report = resolve_conflicts(scan_folder(root), "majority")  # a has 2 copies, b has 1
    assert manifest.set_index("path").loc["a/dup.png", "status"] == "ok"
    assert manifest.set_index("path").loc["b/copy_of_a.png", "status"] == "skipped"


def test_training_testing_layout_keeps_class_labels(tmp_path: Path) -> None:
    root = tmp_path / "mri"
    make_dataset(root / "Training", {"glioma": 4, "notumor": 4})
    make_dataset(root / "Testing", {"glioma": 2, "notumor": 2}, seed=1)
    manifest = scan_folder(root)
    assert set(manifest.label) == {"glioma", "notumor"}
    assert set(manifest.provided_split) == {"train", "test"}
    assert check_classes(manifest) == ["glioma", "notumor"]


@pytest.mark.parametrize("stray", ["masks", "BrainTumor", "extra_copy"])
def test_a_stray_folder_beside_training_and_testing_is_reported_not_read_as_a_class(
    tmp_path: Path, stray: str, caplog
) -> None:
    """Public archives ship Training/ and Testing/ with a masks/ folder or a nested copy beside them: the
    split layout still holds, the stray folder's files are skipped with their reason, and prepare says so."""
    root = tmp_path / "mri"
    make_dataset(root / "Training", {"glioma": 4, "notumor": 4})
    make_dataset(root / "Testing", {"glioma": 2, "notumor": 2}, seed=1)
    make_dataset(root / stray, {"glioma": 2}, seed=2)
    manifest = scan_folder(root)
    ok = manifest[manifest.status == "ok"]
    assert set(ok.label) == {"glioma", "notumor"} and set(ok.provided_split) == {"train", "test"}
    strays = manifest[manifest.path.str.startswith(f"{stray}/")]
    assert len(strays) == 2 and strays.reason.str.startswith("not under a split folder").all()
    assert f"ignoring the other top-level folder(s) {stray}/" in caplog.text


def test_split_named_folders_without_class_folders_stop_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_dataset(root, {"Training": 4, "Testing": 4})  # images straight under the split-named folders
    with pytest.raises(UserError, match=r"Testing/ holds no class sub-folders; expected Testing/<class>/<image>"):
        scan_folder(root)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        # Testing/ holds loose images and an (empty) hidden folder: not a class folder, so still ambiguous.
        (
            lambda root: (
                (root / "Testing" / ".ipynb_checkpoints").mkdir(parents=True),
                make_dataset(root, {"Testing": 3}),
            ),
            "Testing/ holds no class sub-folders",
        ),
        (lambda root: (root / "Validation").mkdir(), "Validation/ is empty"),
        # class folders with a class named test/ that has sub-folders: no training folder to split from
        (lambda root: make_dataset(root / "test", {"x": 2}, seed=3), "no training folder"),
    ],
    ids=["hidden folder is not a class folder", "empty split folder", "no training folder"],
)
def test_ambiguous_split_layouts_stop_with_one_line(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "mri"
    make_dataset(root / "Training" if "no training" not in message else root, {"cat": 3, "dog": 3})
    setup(root)
    with pytest.raises(UserError, match=message):
        scan_folder(root)


def test_a_class_named_train_without_a_test_folder_stays_a_class_and_is_named(tmp_path: Path, caplog) -> None:
    root = tmp_path / "d"
    make_dataset(root, {"train": 3, "bus": 3})
    assert set(scan_folder(root).label) == {"train", "bus"}
    assert "class folder(s) named like a split (train)" in caplog.text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "holds no files"),
        (lambda root: make_dataset(root, {"only": 3}), "at least two"),
        (
            lambda root: (
                make_dataset(root, {"a": 3, "b": 3}),
                (root / "c").mkdir(),
                (root / "c" / "x.png").write_bytes(b""),
            ),
            "'c' hold no usable image",
        ),
    ],
    ids=["missing root", "empty root", "one class", "class without usable image"],
)
def test_data_problems_stop_with_a_clear_message(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(UserError, match=message):
        check_classes(scan_folder(root))
