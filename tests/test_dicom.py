"""DICOM in (imgclf/data/dicom.py) and subject-level splits (imgclf/data/subjects.py, split.py), on DICOM files
written by pydicom here: the pixels a viewer shows, every kind skipped with its own reason, no patient in two
splits, and no identifying value in anything written."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_files import JPEG2000Lossless, RLELossless, mono1_twin, tag_values, write_dicom, write_no_pixels
from helpers import env, make_project, run, shape_image, update_params
from PIL import Image

from imgclf.core.errors import UserError
from imgclf.data.dicom import window_to_8bit
from imgclf.data.images import DEFAULT_RECIPE, ImageRecipe, decode_image, load_image
from imgclf.data.scan import ScanOptions, scan_folder
from imgclf.data.split import _allocate, held_out, spanning_groups, split_manifest
from imgclf.data.subjects import join_groups, key_in_path, keyed_hash, subject_keys

RNG = np.random.default_rng(7)
RAW12 = RNG.integers(0, 4096, (48, 40))  # 12-bit stored values, non-square: rows and columns stay apart


def gray(path: Path, recipe: ImageRecipe = DEFAULT_RECIPE) -> np.ndarray:
    im, _, fmt = decode_image(path, recipe)
    assert fmt == "DICOM"
    return np.asarray(im)[..., 0].astype(int)


def test_12_bit_with_rescale_and_window_is_shown_as_the_file_says(tmp_path: Path) -> None:
    """Modality LUT first (slope 2, intercept -1024: CT-like units), then the file's window (LINEAR, PS3.3
    C.11.2.1.2), by hand."""
    path = write_dicom(tmp_path / "ct.dcm", RAW12, slope=2.0, intercept=-1024.0, center=1500.0, width=3000.0)
    shown = gray(path)
    units = RAW12 * 2.0 - 1024.0
    c, w = 1500.0 - 0.5, 3000.0 - 1.0
    expected = np.clip(np.rint(((units - c) / w + 0.5) * 255), 0, 255)
    np.testing.assert_array_equal(shown, expected)
    assert shown.shape == (48, 40) and shown.min() == 0 and shown.max() == 255  # the window clips both ends


def test_the_percentile_window_is_the_alternative_and_a_file_without_window_gets_it(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ct.dcm", RAW12, slope=2.0, intercept=-1024.0, center=200.0, width=400.0)
    percentile = ImageRecipe(dicom_window="percentile")
    units = RAW12 * 2.0 - 1024.0
    low, high = np.percentile(units, (0.5, 99.5))
    expected = np.clip(np.rint((units - low) * (255 / (high - low))), 0, 255)
    np.testing.assert_array_equal(gray(path, percentile), expected)
    assert not np.array_equal(gray(path), gray(path, percentile))  # the recipe decides
    no_window = write_dicom(tmp_path / "raw.dcm", RAW12, slope=2.0, intercept=-1024.0)
    np.testing.assert_array_equal(gray(no_window), expected)


def test_sigmoid_and_linear_exact_windows_follow_the_standard() -> None:
    x = np.array([-100.0, 0.0, 50.0, 100.0, 200.0])
    np.testing.assert_array_equal(window_to_8bit(x, 50, 100, "LINEAR_EXACT"), [0, 0, 128, 255, 255])
    sigmoid = window_to_8bit(x, 50, 100, "SIGMOID")
    np.testing.assert_array_equal(sigmoid, np.rint(255 / (1 + np.exp(-4 * (x - 50) / 100))))


def test_monochrome1_is_shown_like_its_monochrome2_twin(tmp_path: Path) -> None:
    mono2 = write_dicom(tmp_path / "m2.dcm", RAW12, slope=1.0, intercept=-1024.0, center=800.0, width=2500.0)
    stored, center = mono1_twin(RAW12, 12, 800.0, slope=1.0, intercept=-1024.0)
    twin = {"slope": 1.0, "intercept": -1024.0, "center": center, "width": 2500.0}
    mono1 = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **twin)
    a, b = gray(mono2), gray(mono1)
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - (255 - b)).mean() > 50  # not inverted would be far apart
    _, mode, _ = decode_image(mono1)
    assert mode == "MONOCHROME1"


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes_decode_to_the_same_pixels(tmp_path: Path, syntax: str) -> None:
    plain = write_dicom(tmp_path / "plain.dcm", RAW12, center=2048.0, width=4096.0)
    packed = write_dicom(tmp_path / "packed.dcm", RAW12, center=2048.0, width=4096.0, syntax=syntax)
    assert packed.read_bytes() != plain.read_bytes()
    np.testing.assert_array_equal(gray(packed), gray(plain))


def test_8_bit_without_window_shows_as_stored(tmp_path: Path) -> None:
    pixels = RNG.integers(10, 200, (32, 32))
    path = write_dicom(tmp_path / "us.dcm", pixels, bits=8)
    np.testing.assert_array_equal(gray(path), pixels)


def test_multi_frame_uses_the_middle_frame_and_the_manifest_says_which(tmp_path: Path) -> None:
    frames = np.stack([np.full((24, 24), v) for v in (100, 2000, 4000)])  # constant frames: one level each
    frames[:, 0, 0] = 0
    root = tmp_path / "root"
    write_dicom(root / "a/multi.dcm", frames, center=2048.0, width=4096.0)
    write_dicom(root / "b/single.dcm", RAW12[:24, :24], center=2048.0, width=4096.0)
    assert gray(root / "a/multi.dcm")[5, 5] == round(((2000 - 2047.5) / 4095 + 0.5) * 255)
    assert (
        gray(root / "a/multi.dcm", ImageRecipe(dicom_frame="first"))[5, 5]
        == gray(root / "a/multi.dcm", ImageRecipe(dicom_frame=0))[5, 5]
    )
    assert gray(root / "a/multi.dcm", ImageRecipe(dicom_frame="last"))[5, 5] > 240
    manifest = scan_folder(root, ScanOptions())
    row = manifest.set_index("path").loc["a/multi.dcm"]
    assert row.status == "ok" and row.frame == "2 of 3" and row.format == "DICOM"
    assert manifest.set_index("path").loc["b/single.dcm"].frame == ""
    beyond = scan_folder(root, ScanOptions(recipe=ImageRecipe(dicom_frame=5))).set_index("path").loc["a/multi.dcm"]
    assert beyond.status == "skipped" and "beyond the last" in beyond.reason


def test_every_kind_of_file_gets_a_manifest_row_with_its_own_reason(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_dicom(root / "a/no_extension", RAW12, center=2048.0, width=4096.0)  # a PACS export: no extension
    write_dicom(root / "a/series.1", RAW12, center=2048.0, width=4096.0)  # an odd extension, DICOM content
    write_no_pixels(root / "a/report.dcm")
    (root / "b").mkdir(parents=True)
    (root / "b/notes.dcm").write_text("this is a text file named .dcm\n")
    good = write_dicom(root / "b/good.dcm", RAW12, center=2048.0, width=4096.0)
    (root / "b/truncated.dcm").write_bytes(good.read_bytes()[:-1500])
    (root / "b/readme.txt").write_text("not an image\n")
    manifest = scan_folder(root, ScanOptions()).set_index("path")
    assert manifest.loc["a/no_extension"].status == "ok" and manifest.loc["a/no_extension"].format == "DICOM"
    assert manifest.loc["a/series.1"].status == "ok"
    assert manifest.loc["b/good.dcm"].status == "ok"
    reasons = {p: manifest.loc[p].reason for p in manifest.index if manifest.loc[p].status == "skipped"}
    assert reasons["a/report.dcm"] == "DICOM without pixel data (Basic Text SR Storage)"
    assert reasons["b/notes.dcm"].startswith("not a DICOM file")
    assert reasons["b/truncated.dcm"].startswith("truncated or corrupt DICOM")
    assert reasons["b/readme.txt"].startswith("not an image extension")
    assert set(reasons) == {"a/report.dcm", "b/notes.dcm", "b/truncated.dcm", "b/readme.txt"}


def test_load_image_resizes_dicom_like_any_image(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", RAW12, center=2048.0, width=4096.0)
    image = load_image(path, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert np.array_equal(image[..., 0], image[..., 2])  # gray in three channels


# --- subjects ---


def subject_folder(root: Path, per_patient: dict[int, tuple[str, int]], seed: int = 3) -> Path:
    """DICOM files: patient n has `count` images of class `label` (distinct shapes, so no near-copies)."""
    rng = np.random.default_rng(seed)
    for n, (label, count) in per_patient.items():
        for k in range(count):
            pixels = shape_image(0 if label == "a" else 1, 48, rng).astype(np.int64) * 16
            write_dicom(root / label / f"p{n}_{k}.dcm", pixels, patient_no=n, center=2048.0, width=4096.0)
    return root


def test_allocation_is_by_images_not_groups() -> None:
    """Ten groups, one of 40 images and nine of 4 (76 images): 20% for test means about 15 images, not two
    groups (which could be 44 images). With one image per group it is exactly round(share x n) groups."""
    sizes = [40] + [4] * 9
    got = _allocate(sizes, np.arange(10), {"train": 1.0, "test": 0.2})
    assert sum(sizes[i] for i in got["test"]) == 16 and 0 not in got["test"]
    singles = _allocate([1] * 20, np.arange(20)[::-1], {"train": 1.0, "val": 0.15, "test": 0.25})
    assert singles["test"] == list(range(19, 14, -1)) and singles["val"] == [14, 13, 12]


def test_a_dominant_patient_stays_in_train_and_no_split_is_left_empty() -> None:
    """Nine patients of one image and one of 50, 15% each for test and validation: test and validation take
    single-image patients, the 50-image patient trains (it is more than twice either target)."""
    sizes = [1] * 9 + [50]
    for seed in range(50):
        got = _allocate(sizes, np.random.default_rng(seed).permutation(10), {"train": 1.0, "val": 0.15, "test": 0.15})
        assert 9 in got["train"] and got["test"] and got["val"], (seed, got)
        assert sum(sizes[i] for i in got["test"]) <= 9 and sum(sizes[i] for i in got["val"]) <= 9


DICOM_RULE = {
    "by": "dicom", "dicom_tag": "PatientID", "pattern": None, "csv": None, "unkeyed": "stop", "key_in_path": "stop"
}  # fmt: skip


def split_by_subject(tmp_path: Path, per_patient: dict[int, tuple[str, int]], seed: int = 0):
    root = subject_folder(tmp_path / "root", per_patient)
    manifest = scan_folder(root, ScanOptions())
    subjects = subject_keys(manifest, root, DICOM_RULE, b"k" * 32)
    manifest = join_groups(manifest, subjects)
    keys = dict(zip(manifest.path[subjects.index], subjects, strict=True))
    return keys, split_manifest(manifest, val=0.2, test=0.2, seed=seed)


def test_no_patient_spans_two_splits_and_shares_follow_images(tmp_path: Path) -> None:
    per_patient = {n: ("a" if n < 8 else "b", 1 + (n * 5) % 7) for n in range(16)}  # 1 to 7 images each
    keys, splits = split_by_subject(tmp_path, per_patient)
    owner = {}
    for name, frame in splits.items():
        for path in frame.path:
            assert owner.setdefault(keys[path], name) == name, "a patient in two splits"
    assert len(owner) == 16
    for label in ("a", "b"):
        total = sum(c for lab, c in per_patient.values() if lab == label)
        for name in ("val", "test"):
            got = int((splits[name].label == label).sum())
            assert abs(got - 0.2 * total) <= 3.5, (label, name, got, total)  # within half the largest group
    # Without the subject rule the same files split freely: the test above could fail.
    free = split_manifest(scan_folder(tmp_path / "root", ScanOptions()), val=0.2, test=0.2, seed=0)
    seen: dict[str, set[str]] = {}
    for name, frame in free.items():
        for p in frame.path:
            seen.setdefault(keys[p], set()).add(name)
    assert any(len(s) > 1 for s in seen.values())


def test_unkeyed_dicom_files_stop_the_run_naming_them(tmp_path: Path) -> None:
    root = subject_folder(tmp_path / "root", {0: ("a", 2), 1: ("b", 2)})
    write_dicom(root / "a/anonymous.dcm", RAW12, patient_no=0, extra={"PatientID": ""})
    manifest = scan_folder(root, ScanOptions())
    with pytest.raises(UserError, match=r"by=dicom: 1 kept file\(s\) have no PatientID .* a/anonymous\.dcm"):
        subject_keys(manifest, root, DICOM_RULE, b"k" * 32)
    assert subject_keys(manifest, root, {**DICOM_RULE, "unkeyed": "own_group"}, b"k" * 32).nunique() == 3


def test_pattern_rule_keeps_each_person_in_one_split(tmp_path: Path) -> None:
    """Chest X-ray style names: person<N>_<kind>_<k>.jpeg, several per person, split with the pattern rule."""
    rng = np.random.default_rng(1)
    root = tmp_path / "xray"
    for person in range(16):
        label = "PNEUMONIA" if person < 8 else "NORMAL"
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(1 + person % 4):
            Image.fromarray(shape_image(person // 8, 40, rng)).save(root / label / f"person{person}_virus_{k}.png")
    manifest = scan_folder(root, ScanOptions())
    rule = {**DICOM_RULE, "by": "pattern", "pattern": r"person(\d+)_"}
    subjects = subject_keys(manifest, root, rule, b"k" * 32)
    splits = split_manifest(join_groups(manifest, subjects), val=0.2, test=0.2, seed=0)
    person = {p: p.split("/")[1].split("_")[0] for p in manifest.path}
    owner: dict[str, str] = {}
    for name, frame in splits.items():
        for path in frame.path:
            assert owner.setdefault(person[path], name) == name, f"{person[path]} in two splits"
    assert len(owner) == 16


def test_too_few_patients_stops_with_the_counts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"class 'b' has 2 group\(s\) .* needs at least 3"):
        split_by_subject(tmp_path, {0: ("a", 3), 1: ("a", 3), 2: ("a", 3), 3: ("b", 5), 4: ("b", 5)})


def test_subjects_join_near_copy_groups_in_one_union() -> None:
    """Patient X has images 1 and 2; image 2 is a near-copy of image 3 (patient Y): all three are one group."""
    manifest = pd.DataFrame(
        {
            "path": ["a/1", "a/2", "a/3", "a/4"],
            "status": ["ok"] * 4,
            "sha256": ["s1", "s2", "s3", "s4"],
            "group": ["s1", "s2", "s2", "s4"],  # near-copy grouping put s3 with s2
        }
    )
    joined = join_groups(manifest, pd.Series(["X", "X", "Y", "Z"], index=manifest.index))
    assert list(joined.group) == ["s1", "s1", "s1", "s4"]


def test_pattern_rule_keys_by_the_first_group_and_unkeyed_files_stop(tmp_path: Path) -> None:
    manifest = pd.DataFrame(
        {
            "path": ["P/person1_virus_6.jpeg", "P/person1_bacteria_2.jpeg", "P/person12_virus_1.jpeg", "N/IM-1.jpeg"],
            "status": ["ok"] * 4,
            "sha256": ["s1", "s2", "s3", "s4"],
            "format": ["JPEG"] * 4,
        }
    )
    rule = {
        "by": "pattern",
        "dicom_tag": "PatientID",
        "pattern": r"person(\d+)_",
        "csv": None,
        "unkeyed": "stop",
        "key_in_path": "stop",
    }
    with pytest.raises(UserError, match=r"1 kept file\(s\) have no match of .* N/IM-1.jpeg"):
        subject_keys(manifest, tmp_path, rule, b"k" * 32)
    keys = subject_keys(manifest, tmp_path, {**rule, "unkeyed": "own_group"}, b"k" * 32)
    assert keys[0] == keys[1] == keyed_hash("1", b"k" * 32) and keys[2] == keyed_hash("12", b"k" * 32)
    assert keys[3] not in set(keys[:3]) and len(keys[3]) == 32


def test_csv_rule_reads_the_table_inside_the_root(tmp_path: Path) -> None:
    manifest = pd.DataFrame({"path": ["a/1.png", "a/2.png"], "status": ["ok"] * 2, "sha256": ["s1", "s2"]})
    (tmp_path / "groups.csv").write_text("path,group\na/1.png,007\na/2.png,7\n")
    rule = {
        "by": "csv",
        "dicom_tag": "PatientID",
        "pattern": None,
        "csv": "groups.csv",
        "unkeyed": "stop",
        "key_in_path": "stop",
    }
    keys = subject_keys(manifest, tmp_path, rule, b"k" * 32)
    assert keys[0] == keyed_hash("007", b"k" * 32) != keys[1]  # read as text: 007 is not 7
    with pytest.raises(UserError, match=r"outside data\.root"):
        subject_keys(manifest, tmp_path, {**rule, "csv": "../elsewhere.csv"}, b"k" * 32)


def test_a_subject_key_in_its_own_path_stops_prepare_without_naming_it(tmp_path: Path) -> None:
    """A PACS export `<PatientID>/IM0001.dcm`: the key would go into every tracked table of paths."""
    root = tmp_path / "root"
    for n, label in ((1, "a"), (2, "a"), (3, "b")):
        for k in range(2):
            write_dicom(root / label / f"QXPID{n:04d}ZZ" / f"IM{k:04d}.dcm", RAW12 + 7 * n + k, patient_no=n)
    manifest = scan_folder(root, ScanOptions())
    with pytest.raises(
        UserError, match=r"by=dicom: 6 kept file\(s\) have their subject key \(its DICOM PatientID\)"
    ) as info:
        subject_keys(manifest, root, DICOM_RULE, b"k" * 32)
    assert "QXPID" not in str(info.value) and "IM0000" not in str(info.value)  # neither the key nor a path
    assert subject_keys(manifest, root, {**DICOM_RULE, "key_in_path": "allow"}, b"k" * 32).nunique() == 3
    # A table's keys, any case; keys under 4 characters match paths by chance and are let through.
    manifest = pd.DataFrame({"path": ["a/anon7781_1.png", "a/12.png"], "status": ["ok"] * 2, "sha256": ["s1", "s2"]})
    rule = {**DICOM_RULE, "by": "csv", "csv": "groups.csv"}
    (tmp_path / "groups.csv").write_text("path,group\na/anon7781_1.png,ANON7781\na/12.png,12\n")
    with pytest.raises(UserError, match=r"by=csv: 1 kept file\(s\) .* \(its group in groups\.csv\)"):
        subject_keys(manifest, tmp_path, rule, b"k" * 32)
    (tmp_path / "groups.csv").write_text("path,group\na/anon7781_1.png,P1\na/12.png,12\n")
    assert subject_keys(manifest, tmp_path, rule, b"k" * 32).nunique() == 2


@pytest.mark.parametrize(
    ("key", "path", "written"),
    [
        ("DOE^JANE", "a/Doe_Jane/1.dcm", True),  # as a person reads it: no case, separators or punctuation
        ("AB 1234", "a/ab-1234.dcm", True),
        ("0003", "a/0003/IM1.dcm", True),  # digits only: standing on their own
        ("0003", "a/p_0003_1.png", True),
        ("0003", "a/IM0003.dcm", False),  # inside a longer name or number: chance, not the key
        ("0003", "a/20003/x.dcm", False),
        ("123", "a/123/x.dcm", False),  # under 4 characters
    ],
)
def test_a_key_is_found_in_a_path_as_a_person_would_read_it(key: str, path: str, written: bool) -> None:
    assert key_in_path(key, path) is written


def test_the_split_does_not_depend_on_the_hash_key(tmp_path: Path) -> None:
    per_patient = {n: ("a" if n < 6 else "b", 2 + n % 3) for n in range(12)}
    root = subject_folder(tmp_path / "root", per_patient)
    manifest = scan_folder(root, ScanOptions())
    groups = {
        "by": "dicom",
        "dicom_tag": "PatientID",
        "pattern": None,
        "csv": None,
        "unkeyed": "stop",
        "key_in_path": "stop",
    }
    outputs = []
    for key in (b"1" * 32, b"2" * 32):
        joined = join_groups(manifest, subject_keys(manifest, root, groups, key))
        splits = split_manifest(joined, 0.2, 0.2, seed=0)
        outputs.append([joined.to_csv(index=False)] + [f.to_csv(index=False) for f in splits.values()])
    assert outputs[0] == outputs[1]  # the manifest and every split list, byte for byte


# --- privacy: prepare, eda and split on DICOM; grep everything written ---


def test_no_identifying_value_in_anything_written(tmp_path: Path) -> None:
    per_patient = {n: ("a" if n < 5 else "b", 3) for n in range(10)}
    project = make_project(tmp_path)
    subject_folder(project / "dicom", per_patient)
    write_no_pixels(project / "dicom/a/report.dcm", patient_no=0)
    key_file = tmp_path / "secret" / "group.key"
    update_params(project, {"data.root": "dicom", "data.groups.by": "dicom"})  # data.show_images: auto
    update_params(project, {"split.val": 0.2, "split.test": 0.2})
    environ = env(project) | {"IMGCLF_GROUP_KEY_FILE": str(key_file)}
    out = run([sys.executable, "-m", "dvc", "repro", "split", "eda"], project, environ=environ)
    assert "made a new group-hash key" in out.stderr + out.stdout
    assert key_file.stat().st_mode & 0o777 == 0o600
    manifest = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str, keep_default_na=False)
    assert manifest.set_index("path").loc["a/report.dcm"].reason.startswith("DICOM without pixel data")
    values = tag_values(list(per_patient))
    assert "QXPID0003ZZ" in values
    written = [
        p
        for p in project.rglob("*")
        if p.is_file() and "dicom" not in p.relative_to(project).parts[:1] and ".git" not in p.parts
    ]
    assert any(p.name == "manifest.csv" for p in written)
    assert "no image pixels in the plots (data.show_images: auto and DICOM files are read)" in out.stderr + out.stdout
    for picture in ("samples.png", "augmented.png"):  # data.show_images: auto on DICOM: a note, not a grid
        with Image.open(project / "plots/eda" / picture) as im:
            assert im.height * 3 < im.width, (picture, im.size)
    for path in written:  # every file of the project but the input folder: outputs, DVC's cache, dvc.lock
        data = path.read_bytes()
        for value in values:
            assert value.encode() not in data, f"{value} in {path}"
    # The steward's table (git-ignored, no DVC output): patient 3's files under the keyed hash, which another
    # key (or none: a plain hash) does not give.
    subjects = pd.read_csv(project / "logs/subjects.csv", dtype=str)
    assert "logs/" in (project / ".gitignore").read_text()
    mine = set(subjects.path[subjects.subject == keyed_hash("QXPID0003ZZ", key_file.read_bytes())])
    assert mine == {f"a/p3_{k}.dcm" for k in range(3)}
    assert keyed_hash("QXPID0003ZZ", b"x" * 32) not in set(subjects.subject)


def test_a_patient_in_both_provided_folders_is_reported_and_held_out_of_training() -> None:
    """Training/ and Testing/ as provided; patient X has an image in each. The test folder stays as given, the
    training image is held out (it would leak X into training), and spanning_groups lists both."""
    rows = []
    for split, folder in (("train", "Training"), ("test", "Testing")):
        for label in ("a", "b"):
            for i in range(6 if split == "train" else 2):
                rows.append((f"{folder}/{label}/{split}{i}.png", label, split, f"{folder}{label}{i}"))
    manifest = pd.DataFrame(rows, columns=["path", "label", "provided_split", "sha256"])
    manifest = manifest.assign(status="ok", group=manifest.sha256)
    subject = pd.Series([f"own{i}" for i in range(len(manifest))], index=manifest.index)
    subject[manifest.path.isin(["Training/a/train0.png", "Testing/a/test0.png"])] = "X"
    joined = join_groups(manifest, subject)
    splits = split_manifest(joined, val=0.2, test=0.2, seed=0)
    assert set(splits["test"].path) == set(manifest.path[manifest.provided_split == "test"])
    assert "Training/a/train0.png" not in set(pd.concat([splits["train"], splits["val"]]).path)
    held = held_out(joined, splits)
    assert list(held.path) == ["Training/a/train0.png"] and "same subject" in held.reason[0]
    assert list(spanning_groups(joined).path) == ["Testing/a/test0.png", "Training/a/train0.png"]


# --- files a viewer handles that are easy to get wrong (the review's cases) ---


def test_an_8_bit_voi_lut_of_4096_entries_does_not_wrap(tmp_path: Path) -> None:
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    stored = np.array([[0, 100, 255, 256, 300, 1000, 4095, 4095]] * 16)
    path = write_dicom(tmp_path / "lut.dcm", stored)
    ds = dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new(0x00283006, "US", [i * 255 // 4095 for i in range(4096)])  # LUT Data: a ramp to 255
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    np.testing.assert_array_equal(gray(path)[0], [0, 6, 15, 15, 18, 62, 255, 255])


def test_enhanced_multi_frame_takes_its_window_from_the_functional_groups(tmp_path: Path) -> None:
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    frames = np.stack([RAW12, RAW12])
    path = write_dicom(tmp_path / "enhanced.dcm", frames)
    ds = dcmread(path)
    rescale, window, shared = Dataset(), Dataset(), Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    window.WindowCenter, window.WindowWidth = 40, 400
    shared.PixelValueTransformationSequence, shared.FrameVOILUTSequence = [rescale], [window]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.save_as(path)
    classic = write_dicom(tmp_path / "classic.dcm", RAW12, slope=1.0, intercept=-1024.0, center=40.0, width=400.0)
    np.testing.assert_array_equal(gray(path), gray(classic))


def test_masks_truncated_compressed_files_and_inverse_presentation(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_dicom(root / "a/mask.dcm", RAW12 % 2, bits=8, extra={"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0})
    for name, syntax in (("rle", RLELossless), ("j2k", JPEG2000Lossless)):
        whole = write_dicom(tmp_path / f"{name}.dcm", RAW12, center=2048.0, width=4096.0, syntax=syntax).read_bytes()
        for cut in (200, len(whole) // 2, len(whole) - 10):
            (root / "b").mkdir(parents=True, exist_ok=True)
            (root / f"b/{name}_{cut}.dcm").write_bytes(whole[:cut])
    manifest = scan_folder(root, ScanOptions()).set_index("path")
    assert manifest.loc["a/mask.dcm"].reason.startswith("1-bit DICOM")
    cut = manifest[manifest.index.str.startswith("b/")]
    assert len(cut) == 6 and cut.reason.str.startswith("truncated or corrupt DICOM").all(), cut.reason.to_dict()
    plain = write_dicom(tmp_path / "m2.dcm", RAW12, center=2048.0, width=4096.0)
    inverse = write_dicom(
        tmp_path / "inv.dcm", RAW12, center=2048.0, width=4096.0, extra={"PresentationLUTShape": "INVERSE"}
    )
    assert np.abs(gray(inverse) - (255 - gray(plain))).max() == 0


def test_identity_rescale_on_8_bit_and_a_bad_window_fall_back_as_a_viewer_does(tmp_path: Path) -> None:
    pixels = RNG.integers(10, 200, (32, 32))
    shown = gray(write_dicom(tmp_path / "u8.dcm", pixels, bits=8, slope=1.0, intercept=0.0))
    np.testing.assert_array_equal(shown, pixels)  # not stretched by the percentile window
    bad = write_dicom(tmp_path / "w0.dcm", RAW12, center=100.0, width=0.0)  # LINEAR needs width >= 1
    no_window = write_dicom(tmp_path / "none.dcm", RAW12)
    np.testing.assert_array_equal(gray(bad), gray(no_window))


def test_a_dcm_without_the_part_10_preamble_is_read(tmp_path: Path) -> None:
    from pydicom import dcmread

    path = write_dicom(tmp_path / "part10.dcm", RAW12, center=2048.0, width=4096.0)
    from pydicom.dataset import FileMetaDataset

    ds = dcmread(path)
    ds.file_meta, ds.preamble = FileMetaDataset(), None  # the bare dataset: no preamble, no DICM, no file meta
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert b"DICM" not in bare.read_bytes()[:200]
    np.testing.assert_array_equal(gray(bare), gray(path))


def test_a_bare_dcm_is_keyed_and_a_non_conformant_value_is_never_printed(tmp_path: Path, capfd, caplog) -> None:
    """A UID with a leading-zero component (old exports) makes pydicom warn, quoting it; neither decoding nor
    keying may print it. A .dcm without the preamble is keyed like any DICOM file."""
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset

    secret = "1.2.840.0999.77.4242"
    path = write_dicom(
        tmp_path / "root/a/old.dcm", RAW12, center=2048.0, width=4096.0, extra={"StudyInstanceUID": secret}
    )
    ds = dcmread(path)
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    ds.save_as(tmp_path / "root/a/bare.dcm", enforce_file_format=False, implicit_vr=True, little_endian=True)
    manifest = scan_folder(tmp_path / "root", ScanOptions())
    assert set(manifest.status) == {"ok"}
    rule = {**DICOM_RULE, "dicom_tag": "StudyInstanceUID"}
    keys = subject_keys(manifest, tmp_path / "root", rule, b"k" * 32)
    assert keys.nunique() == 1  # both files: one study
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
