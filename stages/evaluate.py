"""evaluate@<backbone>: test-split metrics, predictions, classification report, confusion matrix, attention.

    python stages/evaluate.py vgg16 --features data/features/vgg16 --test data/split/test.csv \
        --model-dir models/vgg16 --metrics metrics/backbones/vgg16.json --plot-dir plots/backbones/vgg16
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from imgclf.errors import log, stage_main
from imgclf.io import read_json
from imgclf.params import load_params
from imgclf.repro import seed_everything


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    for name in ("--features", "--test", "--model-dir", "--metrics", "--plot-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    seed = params["base"]["seed"]
    seed_everything(seed)

    from imgclf.evaluation import evaluate_and_write
    from imgclf.features import FeatureStore
    from imgclf.images import load_image
    from imgclf.model import attention_model, load_model
    from imgclf.plots import attention_overlay
    from imgclf.predict import Classifier

    test = pd.read_csv(args.test, keep_default_na=False)
    info = read_json(args.model_dir / "info.json")
    classes = info["classes"]
    head = load_model(str(args.model_dir / "head.keras"))
    if info["fine_tuned"]:
        # The backbone changed during fine-tuning: the cached features are stale for this model.
        classifier = Classifier.load(args.model_dir)
        features = classifier.features([Path(params["data"]["root"]) / p for p in test.path])
    else:
        features = FeatureStore(args.features).take(test)
    probs = head.predict(features, batch_size=256, verbose=0)
    metrics = evaluate_and_write(
        args.backbone,
        list(test.path),
        list(test.label),
        probs,
        classes,
        args.metrics,
        args.plot_dir,
        params["evaluate"]["bootstrap"],
        params["evaluate"]["confidence"],
        seed,
    )

    per_class = params["evaluate"]["attention_images_per_class"]
    if per_class:
        chosen = [i for c in classes for i in np.flatnonzero(test.label.to_numpy() == c)[:per_class]]
        maps = attention_model(head).predict(features[chosen], verbose=0)  # (n, h, w)
        images = [load_image(Path(params["data"]["root"]) / test.path[i], info["image_size"]) for i in chosen]
        predicted = np.asarray(classes)[probs[chosen].argmax(axis=1)]
        titles = [f"{test.label[i]} -> {p}" for i, p in zip(chosen, predicted, strict=True)]
        attention_overlay(
            images, maps, titles, rows=len(classes), path=args.plot_dir / "attention.png",
            title=f"{args.backbone}: where the head attends (actual -> predicted)",
        )  # fmt: skip
    ci = metrics["ci"]
    log.info(
        "evaluate@%s: test accuracy %.4f [%.4f, %.4f], macro F1 %.4f, AUC %s",
        args.backbone,
        metrics["accuracy"],
        *ci["accuracy"],
        metrics["macro"]["f1"],
        metrics["roc_auc_ovr_macro"],
    )


if __name__ == "__main__":
    main()
