"""The folders people really have, through `dvc repro` end to end: class names that look like numbers,
names with spaces and accents, two classes only, and the Training/Testing layout of public MRI sets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import TINY, dvc, make_dataset, make_project, run
from PIL import Image

from imgclf.core.io import read_csv

pytestmark = pytest.mark.slow

# data.near_duplicates stays at its default (group): only confirmed near-copies are grouped, so look-alike shapes
# of one class no longer carry the class into one split.
SMALL = {**TINY, "backbones": ["vgg16"], "train.epochs": 3, "evaluate.bootstrap": 50}


def read(project: Path, path: str) -> dict:
    return json.loads((project / path).read_text())


def test_numeric_class_names_stay_five_distinct_text_labels_in_the_training_testing_layout(tmp_path: Path) -> None:
    classes = ["0", "1", "10", "7", "007"]  # all numeric: no text name to keep pandas from parsing them
    project = make_project(tmp_path, SMALL)
    # vary: distinct images (the default shapes of a class differ only in noise: real near-copies, confirmed)
    make_dataset(project / "images" / "Training", dict.fromkeys(classes, 8), size=40, rgb=True, vary=True)
    make_dataset(project / "images" / "Testing", dict.fromkeys(classes, 3), size=40, rgb=True, seed=1, vary=True)
    # A re-export of a test image (brighter, PNG) filed in Training: a confirmed near-copy, held out of training.
    brighter = Image.open(project / "images/Testing/7/7_001.png").point(lambda v: min(255, v + 6))
    brighter.save(project / "images/Training/7/re_export.png")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "data"], project)

    dvc(project, "repro")

    manifest = read_csv(project / "data/prepared/manifest.csv").set_index("path")
    assert manifest.linked_to["Training/7/re_export.png"] == "test"
    held = read_csv(project / "data/split/held_out.csv")
    assert "Training/7/re_export.png" in set(held.path)
    assert set(manifest.linked_to[held.path]) == {"test"}  # held out: linked to a test image, and only those
    for name in ("train", "val"):
        assert not read_csv(project / f"data/split/{name}.csv").linked_to.str.contains("test").any()

    expected = sorted(classes)  # text order: 0, 007, 1, 10, 7
    assert read(project, "models/vgg16/info.json")["classes"] == expected
    for report in ("plots/backbones/vgg16/report.json", "plots/ensemble/report.json"):
        assert sorted(read(project, report)["per_class"]) == expected
        assert all(v["support"] == 3 for v in read(project, report)["per_class"].values())
    predictions = read_csv(project / "plots/backbones/vgg16/predictions.csv")
    assert set(predictions.actual) == set(classes) and set(predictions.predicted) <= set(classes)
    assert [c for c in predictions.columns if c.startswith("p_")] == [f"p_{c}" for c in expected]
    test = read_csv(project / "data/split/test.csv")
    assert set(test.provided_split) == {"test"} and len(test) == 15  # Testing/ is the test split, as provided
    assert read(project, "models/ensemble.json")["backbones"] == ["vgg16"]

    out = run(
        [sys.executable, "-m", "imgclf", "predict", "--backbone", "ensemble", "images/Testing/007"], project
    ).stdout
    assert out.splitlines()[0] == "path,predicted,p_0,p_007,p_1,p_10,p_7,error"


def test_two_classes_with_spaces_and_accents_and_two_augmented_copies(tmp_path: Path) -> None:
    project = make_project(tmp_path, {**SMALL, "augment.copies": 2})
    make_dataset(project / "images", {"sac à main": 14, "chemise é": 14}, size=40, rgb=True)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "data"], project)

    result = dvc(project, "repro")

    metrics = read(project, "plots/backbones/vgg16/report.json")
    assert sorted(metrics["per_class"]) == ["chemise é", "sac à main"]
    # Augmentation: two variants of every unique training image, none of validation or test.
    splits = {name: read_csv(project / f"data/split/{name}.csv") for name in ("train", "val", "test")}
    variants = read_csv(project / "data/augmented/vgg16/index.csv")
    train_hashes = set(splits["train"].sha256)
    assert len(variants) == 2 * len(train_hashes) and set(variants.variant) == {1, 2}
    assert set(variants.sha256) == train_hashes
    assert not set(variants.sha256) & (set(splits["val"].sha256) | set(splits["test"].sha256))
    n = len(train_hashes)
    assert f"augment@vgg16: {2 * n} variants ({n} unique training images x 2 copies)" in result.stderr
    assert f"s: {2 * n} computed, 0 reused" in result.stderr
    assert (project / "plots/eda/augmented.png").stat().st_size > 1000
    assert read(project, "models/vgg16/info.json")["augment"]["copies"] == 2
    assert metrics["roc_auc_ovr_macro"] is not None  # the binary case: AUC of the positive class
    assert metrics["accuracy"] >= 0.75  # bars against vertical bars: random VGG features separate them
    summary = read(project, "plots/compare/summary.json")
    assert summary["best"] in {"vgg16", "ensemble"}
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
