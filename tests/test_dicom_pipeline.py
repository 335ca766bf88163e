"""End to end on a folder of DICOM exports, as issue 20's "done when" says: `dvc repro` with subjects from
PatientID, every file in the manifest (the two non-images skipped with their reasons), no patient in two
splits, no identifying value anywhere in the project (outputs, models, DVC's cache), and predict showing a
MONOCHROME1 file and its MONOCHROME2 twin alike."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_files import JPEG2000Lossless, RLELossless, mono1_twin, tag_values, write_dicom, write_no_pixels
from helpers import env, make_project, run, shape_image
from PIL import Image
from pydicom import dcmread

PATIENTS = 16  # 8 per class, 3 images each
KINDS = ["plain", "rle", "jpeg2000", "no_extension", "8bit", "multiframe", "mono1", "plain"]


def write_exports(root: Path) -> None:
    """Class folders a (horizontal bar) and b (vertical bar) of DICOM files of every kind, plus a report with
    no pixel data and a text file named .dcm."""
    rng = np.random.default_rng(11)
    for n in range(PATIENTS):
        label, kind = "ab"[n // 8], KINDS[n % 8]
        for k in range(3):
            pixels = shape_image(n // 8, 40, rng).astype(np.int64) * 16  # 12-bit values
            name = f"pt{n:02d}_{k}" + ("" if kind == "no_extension" else ".dcm")
            args = {"patient_no": n, "slope": 1.0, "intercept": -1024.0, "center": 1024.0, "width": 4096.0}
            if kind == "rle":
                args["syntax"] = RLELossless
            elif kind == "jpeg2000":
                args["syntax"] = JPEG2000Lossless
            elif kind == "8bit":
                pixels, args = pixels // 16, {"patient_no": n, "bits": 8}
            elif kind == "multiframe":
                pixels = np.stack([pixels // 2, pixels, pixels // 4])
            elif kind == "mono1":
                pixels, center = mono1_twin(pixels, 12, 1024.0, slope=1.0, intercept=-1024.0)
                args |= {"photometric": "MONOCHROME1", "center": center}
            write_dicom(root / label / name, pixels, **args)
    write_no_pixels(root / "a/report.dcm", patient_no=0)
    (root / "b/notes.dcm").write_text("not DICOM: a text file with a .dcm name\n")


@pytest.mark.slow
def test_dicom_folder_runs_end_to_end_without_leaking_a_patient(tmp_path: Path) -> None:
    params = {
        "data.root": "exports",
        "data.groups.by": "dicom",  # data.show_images stays auto: no pixels drawn, as DICOM is read
        "backbones": ["mobilenet"],
        "features.weights": "none",
        "features.image_size": 32,
        "features.precision_overrides": {"vgg16": None, "vgg19": None, "mobilenet": None, "xception": None},
        "train.epochs": 3,
        "train.early_stopping.patience": 2,
        "evaluate.bootstrap": 50,
        "evaluate.attention_images_per_class": 1,
        "split.val": 0.2,
        "split.test": 0.25,
    }
    project = make_project(tmp_path, params)
    write_exports(project / "exports")
    environ = env(project) | {"IMGCLF_GROUP_KEY_FILE": str(tmp_path / "key" / "group.key")}
    run([sys.executable, "-m", "dvc", "repro"], project, environ=environ, timeout=1200)
    log = (project / "logs/imgclf.log").read_text(encoding="utf-8")
    for stage in ("eda", "evaluate@mobilenet"):
        assert f"{stage}: no image pixels in the plots (data.show_images: auto and DICOM files are read)" in log
    with Image.open(project / "plots/backbones/mobilenet/explanations.png") as im:  # a one-line note, no pixels
        assert im.height * 3 < im.width, im.size
    assert json.loads((project / "plots/backbones/mobilenet/explanations.json").read_text())["images"] > 0

    manifest = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str, keep_default_na=False)
    exports = project / "exports"
    files = sorted(p.relative_to(exports).as_posix() for p in exports.rglob("*") if p.is_file())
    assert sorted(manifest.path) == files and len(files) == PATIENTS * 3 + 2
    skipped = manifest[manifest.status == "skipped"].set_index("path").reason
    assert skipped.to_dict() == {
        "a/report.dcm": "DICOM without pixel data (Basic Text SR Storage)",
        "b/notes.dcm": "not a DICOM file (no DICM marker and no DICOM header), whatever the extension",
    }
    assert set(manifest[manifest.status == "ok"].format) == {"DICOM"}
    assert set(manifest.frame) == {"", "2 of 3"}

    owner: dict[str, str] = {}  # patient -> split, from the files' own headers (the outputs hold no patient)
    for name in ("train", "val", "test"):
        split = pd.read_csv(project / f"data/split/{name}.csv", dtype=str, keep_default_na=False)
        assert len(split) and "group_key" not in split
        for path in split.path:
            key = str(dcmread(exports / path, stop_before_pixels=True).PatientID)
            assert owner.setdefault(key, name) == name, f"patient {key} in {owner[key]} and {name}"
    assert len(owner) == PATIENTS

    values = tag_values(list(range(PATIENTS)))
    written = [
        p for p in project.rglob("*") if p.is_file() and p.relative_to(project).parts[0] not in ("exports", ".git")
    ]
    assert any(p.suffix == ".keras" for p in written) and any(".dvc/cache" in p.as_posix() for p in written)
    for path in written:
        data = path.read_bytes()
        leaked = [v for v in values if v.encode() in data]
        assert not leaked, f"{leaked} in {path}"

    # predict: a MONOCHROME2 file and its MONOCHROME1 twin, and a report that has no image.
    new = tmp_path / "new"
    pixels = shape_image(0, 40, np.random.default_rng(5)).astype(np.int64) * 16
    rescale = {"slope": 1.0, "intercept": -1024.0, "width": 3000.0}
    write_dicom(new / "mono2.dcm", pixels, center=900.0, **rescale)
    stored, center = mono1_twin(pixels, 12, 900.0, slope=1.0, intercept=-1024.0)
    write_dicom(new / "mono1", stored, photometric="MONOCHROME1", center=center, **rescale)
    write_no_pixels(new / "report.dcm")
    result = run([sys.executable, "-m", "imgclf", "predict", "--backbone", "mobilenet", str(new)], project, check=False)
    assert result.returncode == 3, result.stderr  # some files could not be read
    table = pd.read_csv(io.StringIO(result.stdout), keep_default_na=False).set_index("path")
    rows = {Path(p).name: row for p, row in table.iterrows()}
    assert rows["report.dcm"].error.startswith("DICOM without pixel data")
    p1 = rows["mono1"][["p_a", "p_b"]].astype(float).to_numpy()
    p2 = rows["mono2.dcm"][["p_a", "p_b"]].astype(float).to_numpy()
    assert np.abs(p1 - p2).max() <= 1e-3, (p1, p2)
