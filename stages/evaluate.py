"""evaluate@<backbone>: test-split metrics, predictions, classification report, confusion matrix, attention,
calibration (ECE and Brier before and after the model's temperature, reliability diagram); and the validation
split's predictions, on which compare picks the best model. Every probability written is calibrated.

    python -m stages.evaluate vgg16 --features data/features/vgg16 --split-dir data/split \
        --manifest data/prepared/manifest.csv --model-dir models/vgg16 --metrics metrics/backbones/vgg16.json \
        --plot-dir plots/backbones/vgg16
"""

import argparse
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.core.errors import log, stage_main
from imgclf.core.io import read_csv, read_json, write_json
from imgclf.core.repro import seed_everything
from imgclf.data.images import ImageRecipe
from imgclf.params import images_shown, load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    for name in ("--features", "--split-dir", "--manifest", "--model-dir", "--metrics", "--plot-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    seed = params["base"]["seed"]
    seed_everything(seed)

    from imgclf.features.backbone_pass import EXTRACTOR_FILE, load_or_stop
    from imgclf.features.extractor import load_extractor
    from imgclf.features.store import FeatureBatches, FeatureStore
    from imgclf.head.model import attention_model, load_model
    from imgclf.results import explain
    from imgclf.results.calibration import apply_temperature
    from imgclf.results.evaluation import accuracy_and_loss, evaluate_and_write, write_predictions
    from imgclf.results.plots import attention_overlay, explanation_panels, faithfulness_plot, withheld_picture
    from imgclf.results.predict import Classifier

    root = Path(params["data"]["root"])
    splits = {name: read_csv(args.split_dir / f"{name}.csv") for name in ("val", "test")}
    info = read_json(args.model_dir / "info.json")
    classes = info["classes"]
    recipe = ImageRecipe.from_params(params["data"])
    head = load_model(str(args.model_dir / "head.keras"))
    if info["fine_tuned"]:
        # The backbone changed during fine-tuning: the cached features are stale for this model. Features
        # are computed chunk by chunk, each chunk's probabilities kept (memory: one chunk of feature maps).
        classifier = Classifier.load(args.model_dir)

        def features_of(frame: pd.DataFrame) -> np.ndarray:
            return classifier.features([root / p for p in frame.path])

        def probabilities(frame: pd.DataFrame) -> np.ndarray:
            chunks = [frame.iloc[i : i + 512] for i in range(0, len(frame), 512)]
            return np.concatenate([classifier.predict_features(features_of(c), calibrated=False) for c in chunks])
    else:
        # Cached features, read from disk batch by batch (FeatureBatches), in the frame's order.
        store = FeatureStore(args.features)

        def features_of(frame: pd.DataFrame) -> np.ndarray:
            return store.take(frame)

        def probabilities(frame: pd.DataFrame) -> np.ndarray:
            batches = FeatureBatches([(store.array, store.rows(frame), np.zeros(len(frame)))], 256)
            return head.predict(batches, verbose=0)

    # The head's probabilities, then the temperature train@ fitted (info.json), as predict applies it.
    temperature = float((info.get("calibration") or {}).get("temperature", 1.0))
    raw = {name: probabilities(frame) for name, frame in splits.items()}
    probs = {name: apply_temperature(p, temperature) for name, p in raw.items()}
    val, test = splits["val"], splits["test"]
    write_predictions(args.plot_dir / "val_predictions.csv", list(val.path), list(val.label), probs["val"], classes)
    # model.json (tracked in git) says where the numbers were computed: a reproduction on another CPU type is
    # judged against them statistically (`imgclf verify`), not byte for byte.
    keys = ("backbone", "classes", "image_size", "precision", "model_params", "head_params", "best_epoch", "fine_tune",
            "calibration", "platform")  # fmt: skip
    write_json(args.plot_dir / "model.json", {k: info.get(k) for k in keys})
    metrics = evaluate_and_write(
        args.backbone,
        list(test.path),
        list(test.label),
        probs["test"],
        classes,
        args.metrics,
        args.plot_dir,
        params["evaluate"]["bootstrap"],
        params["evaluate"]["confidence"],
        seed,
        # The tracked val_loss is the calibrated one, which T was fitted to lower (in-sample); the head's own is kept.
        validation=accuracy_and_loss(list(val.label), probs["val"], classes)
        | {"loss_uncalibrated": accuracy_and_loss(list(val.label), raw["val"], classes)["loss"]},
        groups=list(test.group) if "group" in test else None,
        uncalibrated=raw["test"],
        temperature=temperature,
        bins=params["evaluate"]["calibration_bins"],
    )

    manifest = read_csv(args.manifest)  # patients' images? DICOM anywhere in the dataset (as eda decides)
    dicom_read = bool(((manifest.status == "ok") & (manifest.format == "DICOM")).any())
    show = images_shown(params["data"], dicom_read, f"evaluate@{args.backbone}")
    size = info["image_size"]

    def pixels(rows: list[int]) -> list[np.ndarray]:
        return [load_or_stop(root / test.path[i], size, recipe) for i in rows]

    per_class = params["evaluate"]["attention_images_per_class"]
    if per_class:  # at least 1 (params.py)
        chosen = [i for c in classes for i in np.flatnonzero(test.label.to_numpy() == c)[:per_class]]
        chosen_features = features_of(test.iloc[chosen])
        maps = attention_model(head).predict(chosen_features, verbose=0)  # (n, h, w)
        images = pixels(chosen) if show else [np.zeros((size, size, 3), np.float32) for _ in chosen]
        predicted = np.asarray(classes)[probs["test"][chosen].argmax(axis=1)]
        titles = [f"{test.label[i]} -> {p}" for i, p in zip(chosen, predicted, strict=True)]
        attention_overlay(
            images, maps, titles, rows=len(classes), path=args.plot_dir / "attention.png",
            title=f"{args.backbone}: where the head attends (actual -> predicted)", show_images=show,
        )  # fmt: skip
        if show:  # the same images, and as many wrong predictions: original | attention | Grad-CAM (both classes)
            wrong = np.flatnonzero(probs["test"].argmax(axis=1) != [classes.index(c) for c in test.label])
            rows = chosen + [int(i) for i in wrong if i not in set(chosen)][:per_class]
            features = features_of(test.iloc[rows])
            predicted_index = probs["test"][rows].argmax(axis=1)
            true_index = np.array([classes.index(c) for c in test.label[rows]])
            maps_shown = {
                "attention": explain.attention_maps(head, features),
                "Grad-CAM, predicted": explain.grad_cam(head, features, predicted_index, temperature),
                "Grad-CAM, true class": explain.grad_cam(head, features, true_index, temperature),
            }
            labels = [f"{test.label[i]} -> {classes[k]}" for i, k in zip(rows, predicted_index, strict=True)]
            explanation_panels(
                images + pixels(rows[len(chosen) :]), maps_shown, labels, args.plot_dir / "explanations.png",
                title=f"{args.backbone}: attention and Grad-CAM (actual -> predicted; the last rows: wrong ones)",
            )  # fmt: skip
        else:
            withheld_picture(args.plot_dir / "explanations.png", f"{args.backbone}: attention and Grad-CAM")

    # Checked explanations (results/explain.py) on the first test images of each class: sanity and faithfulness.
    report = explanation_report(
        head, test, features_of, probs["test"], temperature, params["evaluate"], seed, pixels,
        extractor=classifier.extractor if info["fine_tuned"] else load_extractor(str(args.features / EXTRACTOR_FILE)),
    )  # fmt: skip
    write_json(args.plot_dir / "explanations.json", report)
    faithfulness_plot(report["faithfulness"], args.plot_dir / "faithfulness.png",
                      f"{args.backbone}: deletion and insertion ({report['images']} test images)")  # fmt: skip
    write_json(args.metrics, {**read_json(args.metrics), "explanations": explanation_metrics(report)}, sort_keys=False)
    ci = metrics["ci"]
    cal = metrics["calibration"]
    log.info(
        "evaluate@%s: test accuracy %.4f [%.4f, %.4f], macro F1 %.4f, AUC %s, ECE %.4f -> %.4f (T = %g)",
        args.backbone,
        metrics["accuracy"],
        *ci["accuracy"],
        metrics["macro"]["f1"],
        metrics["roc_auc_ovr_macro"],
        cal["ece_before"],
        cal["ece_after"],
        temperature,
    )


def explanation_report(
    head: Any,
    test: pd.DataFrame,
    features_of: Any,
    test_probs: np.ndarray,
    temperature: float,
    options: dict[str, Any],
    seed: int,
    pixels: Any,
    extractor: Any,
) -> dict[str, Any]:
    """Sanity (model randomisation) and faithfulness (deletion, insertion) of Grad-CAM and attention on up to
    evaluate.explain_images test images, the first of each class in turn; the predicted class is explained."""
    from imgclf.results import explain
    from imgclf.results.calibration import apply_temperature

    labels = test.label.to_numpy()
    by_class = [list(np.flatnonzero(labels == c)) for c in sorted(set(labels))]
    rows = [r for group in zip_longest(*by_class) for r in group if r is not None][: options["explain_images"]]
    predicted = test_probs[rows].argmax(axis=1)
    features = features_of(test.iloc[rows])

    def predict(batch: np.ndarray) -> np.ndarray:  # called directly (eagerly): predict() would retrace per shape
        out = [np.asarray(head(extractor(batch[k : k + 32], training=False), training=False))
               for k in range(0, len(batch), 32)]  # fmt: skip
        return apply_temperature(np.concatenate(out).astype(np.float64), temperature)

    maps = explain.explain_maps(head, features, predicted, temperature)
    return {
        "images": len(rows),
        "explained_class": "predicted",
        "sanity": explain.sanity_check(head, features, predicted, temperature, seed),
        "faithfulness": explain.deletion_insertion(
            predict, np.asarray(pixels(rows), np.float32), maps, predicted, options["explain_steps"], seed
        ),
    }


def explanation_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The tracked numbers (metrics/backbones/<bb>.json): per method the deletion and insertion areas and the
    sanity correlation, and random order's areas to compare with."""
    faith, sanity = report["faithfulness"], report["sanity"]
    out: dict[str, Any] = {}
    for method in ("gradcam", "attention", "random"):
        out[f"{method}_deletion_auc"] = faith[method]["deletion"]["auc"]
        out[f"{method}_insertion_auc"] = faith[method]["insertion"]["auc"]
    for method in ("gradcam", "attention"):
        out[f"{method}_sanity_abs_spearman"] = sanity[method]["abs_spearman_all_randomized"]
        out[f"{method}_sanity_passes"] = sanity[method]["passes"]
    return out


if __name__ == "__main__":
    main()
