"""End to end: `dvc repro` of the whole pipeline on tiny data (random weights, few epochs), then what a
reviewer and a user do with it: read the metrics, change a param, classify new images."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import E2E_BACKBONES as BACKBONES
from helpers import dvc, run, update_params
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from imgclf.core.io import read_csv
from imgclf.results.calibration import brier_score, expected_calibration_error

pytestmark = pytest.mark.slow


def read(project: Path, path: str):
    return json.loads((project / path).read_text())


@pytest.mark.xdist_group("trained")  # runs DVC in the shared project: one such test at a time
def test_repro_trains_and_records_every_backbone(trained: Path) -> None:
    for bb in BACKBONES:
        features = read(trained, f"data/features/{bb}/info.json")
        assert features["weights"] == "none" and features["feature_shape"][:2] == [2, 2]
        info = read(trained, f"models/{bb}/info.json")
        precision = {"vgg16": "bfloat16", "mobilenet": "float32"}[bb]  # TINY's features.precision(_overrides)
        assert features["precision"] == info["precision"] == precision
        assert info["classes"] == ["hbar", "ring", "vbar"] and not info["fine_tuned"]
        # Where it was computed: the machine's type, never the host (the same type must give the same bytes).
        platform = read(trained, f"plots/backbones/{bb}/model.json")["platform"]
        assert platform["train"] == platform["features"] == features["platform"]
        assert set(platform["train"]) == {"machine", "cpu_vendor", "cpu_flags", "gpus", "tensorflow", "keras", "numpy"}
        assert read(trained, f"plots/backbones/{bb}/model.json")["precision"] == precision
        assert platform["train"]["tensorflow"].startswith("2.") and "avx2" in platform["train"]["cpu_flags"]
        assert (trained / f"models/{bb}/model.keras").is_file() and (trained / f"models/{bb}/head.keras").is_file()
        curve = pd.read_csv(trained / f"dvclive/train/{bb}/plots/metrics/val_accuracy.tsv", sep="\t")
        assert len(curve) == info["epochs_run"] and 1 <= info["best_epoch"] <= info["epochs_run"]
        for png in ("history.png", "confusion.png", "attention.png", "reliability.png"):
            assert (trained / f"plots/backbones/{bb}/{png}").stat().st_size > 1000
        # Calibrated on validation by default (train.calibration: temperature), recorded with the model.
        calibration = info["calibration"]
        assert calibration["method"] == "temperature" and 0.05 <= calibration["temperature"] <= 20
        assert calibration["val_log_loss_after"] <= calibration["val_log_loss_before"]
        # evaluate@ applied the very temperature train@ fitted: its validation losses are train's, before and after.
        validation = read(trained, f"plots/backbones/{bb}/report.json")["validation"]
        assert validation["loss_uncalibrated"] == pytest.approx(calibration["val_log_loss_before"], abs=1e-4)
        assert validation["loss"] == pytest.approx(calibration["val_log_loss_after"], abs=1e-4)
    assert "Data and pipelines are up to date" in dvc(trained, "status").stdout


def test_near_copies_are_grouped_end_to_end_and_no_confirmed_pair_crosses_splits(trained: Path) -> None:
    """The default data.near_duplicates: group, through dvc repro: confirmed near-copies share a group, split
    puts every group's images into one split, and so both images of every confirmed pair in one split."""
    manifest = read_csv(trained / "data/prepared/manifest.csv")
    ok = manifest[manifest.status == "ok"]
    assert (ok.group != ok.sha256).any(), "no near-copy was grouped: the default `group` never ran"
    homes = pd.concat(
        [read_csv(trained / f"data/split/{name}.csv").assign(split=name) for name in ("train", "val", "test")]
    )
    assert len(homes) == len(ok) and (homes.groupby("group").split.nunique() == 1).all()
    pairs = read_csv(trained / "data/prepared/near_duplicates.csv")
    confirmed = pairs[pairs.confirmed]
    assert len(confirmed) and (~pairs.confirmed).any()  # both kinds of candidate on these look-alike shapes
    home = dict(zip(homes.path, homes.split, strict=True))
    assert all(home[a] == home[b] for a, b in zip(confirmed.path_a, confirmed.path_b, strict=True))


def test_vgg16_learns_on_random_weights(trained: Path) -> None:
    """Random-init VGG16 features separate simple shapes well; a head that cannot learn them is broken."""
    assert read(trained, "metrics/backbones/vgg16.json")["accuracy"] >= 0.8


@pytest.mark.parametrize("name", [*BACKBONES, "ensemble"])
def test_metrics_agree_with_predictions(trained: Path, name: str) -> None:
    folder = "plots/ensemble" if name == "ensemble" else f"plots/backbones/{name}"
    metrics = read(trained, f"{folder}/report.json")  # every number; the tracked metrics are its headline
    tracked = read(trained, "metrics/ensemble.json" if name == "ensemble" else f"metrics/backbones/{name}.json")
    val = read_csv(trained / folder / "val_predictions.csv")
    if name != "ensemble":  # a backbone's explanation checks (explanations.json) are tracked too
        report = read(trained, f"{folder}/explanations.json")
        explained = tracked.pop("explanations")
        assert explained["gradcam_insertion_auc"] == report["faithfulness"]["gradcam"]["insertion"]["auc"]
        assert explained["attention_sanity_passes"] == report["sanity"]["attention"]["passes"]
        assert len(explained) == 10
    assert tracked == {
        "val_accuracy": pytest.approx((val.actual == val.predicted).mean(), abs=1e-6),
        "val_loss": pytest.approx(
            log_loss(
                val.actual, val[[f"p_{c}" for c in metrics["per_class"]]].to_numpy(), labels=list(metrics["per_class"])
            ),
            abs=1e-5,
        ),
        "accuracy": metrics["accuracy"],
        "accuracy_low": metrics["ci"]["accuracy"][0],
        "accuracy_high": metrics["ci"]["accuracy"][1],
        "macro_f1": metrics["macro"]["f1"],
        "macro_f1_low": metrics["ci"]["macro_f1"][0],
        "macro_f1_high": metrics["ci"]["macro_f1"][1],
        "roc_auc": metrics["roc_auc_ovr_macro"],
        "loss": metrics["loss"],
        "ece": metrics["calibration"]["ece_after"],
    }
    predictions = read_csv(trained / folder / "predictions.csv")
    test = read_csv(trained / "data/split/test.csv")
    assert list(predictions.path) == list(test.path) and list(predictions.actual) == list(test.label)
    assert list(predictions.group) == list(test.group)  # so that `imgclf diff` resamples groups at any revision
    assert metrics["ci"]["resampled"] == "groups" and metrics["ci"]["groups"] == test.group.nunique()
    probs = predictions[[c for c in predictions.columns if c.startswith("p_")]].to_numpy()
    classes = [c[2:] for c in predictions.columns if c.startswith("p_")]
    assert list(np.asarray(classes)[probs.argmax(axis=1)]) == list(predictions.predicted)
    assert metrics["test_images"] == len(predictions)
    assert metrics["accuracy"] == pytest.approx((predictions.actual == predictions.predicted).mean(), abs=1e-6)
    macro = f1_score(predictions.actual, predictions.predicted, average="macro", zero_division=0)
    assert metrics["macro"]["f1"] == pytest.approx(macro, abs=1e-6)
    supports = {c: m["support"] for c, m in metrics["per_class"].items()}
    assert supports == predictions.actual.value_counts().to_dict()  # confusion rows add up to the test size
    assert sum(supports.values()) == len(test)
    for key, point in (("accuracy", metrics["accuracy"]), ("macro_f1", metrics["macro"]["f1"])):
        low, high = metrics["ci"][key]
        assert low <= point <= high
    index = {c: i for i, c in enumerate(classes)}
    auc = roc_auc_score(predictions.actual.map(index), probs / probs.sum(axis=1, keepdims=True), multi_class="ovr")
    assert metrics["roc_auc_ovr_macro"] == pytest.approx(auc, abs=1e-6)
    # The tracked ECE is that of the written (calibrated) probabilities; the reliability table covers every image.
    y = predictions.actual.map(index).to_numpy()
    assert metrics["calibration"]["ece_after"] == pytest.approx(expected_calibration_error(probs, y, 15), abs=1e-6)
    assert metrics["calibration"]["brier_after"] == pytest.approx(brier_score(probs, y), abs=1e-6)
    reliability = read_csv(trained / folder / "reliability.csv")
    assert reliability.images.sum() == len(predictions)


def test_summary_has_every_backbone_and_the_ensemble_and_picks_the_best_on_validation(trained: Path) -> None:
    summary = read(trained, "plots/compare/summary.json")
    assert set(summary["models"]) == {*BACKBONES, "ensemble"}
    by_val = sorted(summary["models"].items(), key=lambda kv: (-kv[1]["val_accuracy"], kv[1]["val_loss"], kv[0]))
    assert summary["best"] == by_val[0][0]
    for name in BACKBONES:  # validation accuracy computed by evaluate = the restored epoch's in training
        info = read(trained, f"models/{name}/info.json")
        assert summary["models"][name]["val_accuracy"] == pytest.approx(info["best_val_accuracy"], abs=1e-6)
    table = (trained / "plots/compare/summary.md").read_text()
    for name in (*BACKBONES, "ensemble"):
        assert f"| {name} |" in table


def test_predict_reproduces_evaluate(trained: Path, tmp_path: Path) -> None:
    """predict's probabilities are the calibrated test predictions, for each backbone and the ensemble; and
    predict applies the recorded temperature: with it doubled in a copy of the models (the tiny project's
    validation split may be too small to fit one), it gives evaluate@'s probabilities at twice the temperature."""
    import shutil

    from imgclf.results.calibration import apply_temperature

    test = read_csv(trained / "data/split/test.csv")
    inputs = [str(Path("images") / p) for p in test.path]
    pred = tmp_path / "pred.csv"  # not in the shared project: its git tree must stay clean for other tests

    def predicted(bb: str, *extra: str) -> pd.DataFrame:
        out = run(
            [sys.executable, "-m", "imgclf", "predict", "--backbone", bb, "--out", str(pred), *extra, *inputs], trained
        )
        assert f"{len(test)} of {len(test)} images classified" in out.stderr
        return read_csv(pred)

    evaluated = {}
    for bb in [*BACKBONES, "ensemble"]:
        folder = "plots/ensemble" if bb == "ensemble" else f"plots/backbones/{bb}"
        evaluated[bb] = read_csv(trained / folder / "predictions.csv")
        got = predicted(bb)
        assert list(got.predicted) == list(evaluated[bb].predicted)
        columns = [c for c in evaluated[bb].columns if c.startswith("p_")]
        np.testing.assert_allclose(got[columns].to_numpy(), evaluated[bb][columns].to_numpy(), atol=2e-6)
    for bb, record in ((BACKBONES[0], f"{BACKBONES[0]}/info.json"), ("ensemble", "ensemble.json")):
        models = tmp_path / f"models_{bb}"
        shutil.copytree(trained / "models", models)
        info = json.loads((models / record).read_text())
        holder = info.get("calibration", info)
        holder["temperature"] = 2 * float(holder["temperature"])
        (models / record).write_text(json.dumps(info))
        columns = [c for c in evaluated[bb].columns if c.startswith("p_")]
        hotter = predicted(bb, "--models-dir", str(models))[columns].to_numpy()
        # Calibrated at T is softmax(log p / T); at 2T it is the calibrated probabilities at temperature 2.
        expected = apply_temperature(evaluated[bb][columns].to_numpy(dtype=np.float64), 2.0)
        np.testing.assert_allclose(hotter, expected, atol=1e-4)
        assert np.abs(hotter - evaluated[bb][columns].to_numpy()).max() > 1e-3  # the temperature did something


def test_fine_tuning_runs_end_to_end_and_evaluates_the_tuned_model(copy_of: Path) -> None:
    update_params(copy_of, {"backbones": ["vgg16"], "fine_tune.layers": 2, "fine_tune.epochs": 1})
    out = dvc(copy_of, "repro", "evaluate@vgg16").stdout
    assert "Stage 'features@vgg16' didn't change, skipping" in out
    info = read(copy_of, "models/vgg16/info.json")
    assert info["fine_tuned"] and info["fine_tuned_layers"] == ["block5_conv3"]  # block5_pool has no weights
    assert read(copy_of, "plots/backbones/vgg16/report.json")["test_images"] > 0


def test_a_new_image_reruns_the_backbone_pass_but_not_the_variants_extractor_deps(copy_of: Path) -> None:
    """augment@ depends on the extractor (extractor.keras, extractor.json), not on the features: one more image
    reruns features@, and augment@ sees no change in what it reads (only train.csv, if the image went there)."""
    from helpers import shape_image
    from PIL import Image

    Image.fromarray(shape_image(0, 40, np.random.default_rng(123))).convert("RGB").save(copy_of / "images/hbar/new.png")
    out = dvc(copy_of, "repro", "features@vgg16").stdout
    assert "Running stage 'features@vgg16'" in out
    status = json.loads(dvc(copy_of, "status", "--json", "augment@vgg16").stdout)
    changed = {
        k for item in status.get("augment@vgg16", []) if isinstance(item, dict) for k in item.get("changed deps", {})
    }
    assert changed <= {"data/split/train.csv"}, changed


def test_a_weights_file_replaced_in_place_reruns_the_backbone_pass(copy_of: Path) -> None:
    """weights/ is a dependency of every features@: a file replaced there (same name, new content) is seen."""
    (copy_of / "weights" / "vgg16.h5").write_bytes(b"first weights")
    assert "Running stage 'features@vgg16'" in dvc(copy_of, "repro", "features@vgg16").stdout
    (copy_of / "weights" / "vgg16.h5").write_bytes(b"other weights, same file name")
    status = json.loads(dvc(copy_of, "status", "--json", "features@vgg16").stdout)
    assert {"weights": "modified"} in [item.get("changed deps") for item in status["features@vgg16"]]


def test_explanations_are_checked_tracked_and_drawn_and_explain_reads_new_images(trained: Path, tmp_path: Path) -> None:
    """evaluate@ writes the sanity and faithfulness report, tracks its numbers as metrics and draws the panels;
    `imgclf explain` gives new images the same panels with predict's probabilities, and an error row for a file
    it cannot read (exit 3)."""
    for bb in BACKBONES:
        report = json.loads((trained / f"plots/backbones/{bb}/explanations.json").read_text())
        assert report["images"] == 6 and set(report["sanity"]) >= {"gradcam", "attention", "cascade", "threshold"}
        assert set(report["faithfulness"]) >= {"gradcam", "attention", "random", "fractions"}
        tracked = json.loads((trained / f"metrics/backbones/{bb}.json").read_text())["explanations"]
        assert tracked["gradcam_deletion_auc"] == report["faithfulness"]["gradcam"]["deletion"]["auc"]
        for name in ("explanations.png", "faithfulness.png"):
            assert (trained / f"plots/backbones/{bb}" / name).stat().st_size > 5000, (bb, name)
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], trained).stdout
    assert "gradcam_deletion_auc" in shown  # what `dvc metrics diff` compares

    test = read_csv(trained / "data/split/test.csv")
    folder = tmp_path / "new"
    folder.mkdir()
    for p in test.path[:3]:
        (folder / Path(p).name).write_bytes((trained / "images" / p).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "explained"
    result = run([sys.executable, "-m", "imgclf", "explain", "--backbone", BACKBONES[0], "--out", str(out),
                  str(folder)], trained, check=False)  # fmt: skip
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    table = read_csv(out / "explanations.csv")
    assert len(table) == 4 and (table.error != "").sum() == 1
    assert len(list(out.glob("*.png"))) == 3
    pred = run([sys.executable, "-m", "imgclf", "predict", "--backbone", BACKBONES[0], str(folder)], trained,
               check=False).stdout  # fmt: skip
    predicted = pd.read_csv(io.StringIO(pred), keep_default_na=False)
    assert list(predicted.predicted) == list(table.predicted)
    columns = [c for c in table.columns if c.startswith("p_")]
    good = table.error == ""
    np.testing.assert_allclose(
        table.loc[good, columns].astype(float).to_numpy(),
        predicted.loc[good, columns].astype(float).to_numpy(),
        atol=2e-6,
    )
