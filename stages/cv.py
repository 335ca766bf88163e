"""cv@<backbone>: k-fold cross-validation of the attention head on the cached features (no backbone pass).

    python -m stages.cv vgg16 --features data/features/vgg16 --split-dir data/split --oof plots/cv/vgg16/oof.csv \
        --folds-csv plots/cv/vgg16/folds.csv --metrics metrics/cv/vgg16.json

Folds: stratified group k-fold over train + validation (test untouched), `cv.repeats` times with different
seeds. Per fold: the head and params of train@ (train.overrides included), early stopping on an inner
validation part of the training folds (`cv.inner_val`, whole groups), oversampling (`balance.method`) of the
remaining training rows only. Augmented variants are not used (they exist for the training split only).
Writes the out-of-fold probabilities of every train + validation image (--oof), per-fold metrics
(folds.csv) and their mean, sd and t-interval (metrics). With `cv.folds: 0`: the same files, empty, and
TensorFlow is never imported.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from imgclf.core.errors import log, stage_main
from imgclf.core.io import read_csv, write_csv, write_json
from imgclf.features.backbones import get_backbone
from imgclf.params import load_params, train_params
from imgclf.results.crossval import (
    FOLD_COLUMNS,
    OOF_COLUMNS,
    assign_folds,
    class_fold_shortfall,
    empty_outputs,
    fold_metrics,
    fold_plan,
    pool,
    summary,
)
from imgclf.results.evaluation import format_probability, probability_columns


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    for name in ("--features", "--split-dir", "--oof", "--folds-csv", "--metrics"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    backbone = get_backbone(args.backbone)
    cv = params["cv"]
    seed = params["base"]["seed"]
    data = pool(read_csv(args.split_dir / "train.csv"), read_csv(args.split_dir / "val.csv"))
    classes = sorted(set(data.label))
    if cv["folds"] == 0:
        oof, folds = empty_outputs(classes)
        write_csv(oof, args.oof)
        write_csv(folds, args.folds_csv)
        write_json(args.metrics, {"folds": 0})
        log.info("cv@%s: off (cv.folds: 0)", backbone.name)
        return

    from imgclf.core.repro import seed_everything

    seed_everything(seed)
    from imgclf.features.store import FeatureBatches, FeatureStore
    from imgclf.head.training import build_head, fit_head

    store = FeatureStore(args.features)
    tp = train_params(params, backbone.name)
    index = {c: i for i, c in enumerate(classes)}
    labels, groups = data.label.to_numpy(), data.group.to_numpy()
    for label, n in class_fold_shortfall(labels, groups, cv["folds"]).items():
        log.warning(
            "cv@%s: class %r has %d group(s) for %d folds: some folds test none of it", backbone.name, label, n,
            cv["folds"],
        )  # fmt: skip
    oof_parts, fold_rows = [], []
    start = time.perf_counter()
    for repeat in range(cv["repeats"]):
        folds = assign_folds(labels, groups, cv["folds"], seed + 1000 * repeat)
        for k in range(cv["folds"]):
            plan = fold_plan(data, folds, k, cv["inner_val"], params["balance"]["method"], seed + 1000 * repeat)
            y = {name: plan[name].label.map(index).to_numpy() for name in plan}
            mean, variance = store.channel_stats(plan["train"])
            head = build_head(store.feature_shape, len(classes), tp, mean, variance)
            batches = {
                name: FeatureBatches(
                    [(store.array, store.rows(plan[name]), y[name])],
                    tp["batch_size"],
                    shuffle_seed=seed + 1000 * repeat + k if name == "train" else None,
                )
                for name in plan
            }
            result = fit_head(head, batches["train"], batches["inner_val"], tp)
            probs = np.asarray(head.predict(batches["held"], verbose=0), dtype=np.float64)
            held = plan["held"]
            part = held[["path", "label", "group"]].assign(repeat=repeat, fold=k)
            for j, column in enumerate(probability_columns(classes)):
                part[column] = [format_probability(v) for v in probs[:, j]]
            oof_parts.append(part)
            fold_rows.append(
                {
                    "repeat": repeat,
                    "fold": k,
                    "images": len(held),
                    "train_rows": len(plan["train"]),
                    "inner_val_images": len(plan["inner_val"]),
                    "epochs_run": result["epochs_run"],
                    "best_epoch": result["best_epoch"],
                    **fold_metrics(y["held"], probs, len(classes)),
                }
            )
    import pandas as pd

    oof = pd.concat(oof_parts, ignore_index=True)
    oof = oof[[*OOF_COLUMNS, *probability_columns(classes)]].sort_values(["repeat", "path"]).reset_index(drop=True)
    folds_table = pd.DataFrame(fold_rows, columns=FOLD_COLUMNS)
    metrics = summary(folds_table, params["evaluate"]["confidence"])
    write_csv(oof, args.oof)
    write_csv(folds_table, args.folds_csv)
    write_json(args.metrics, metrics)
    runs = cv["folds"] * cv["repeats"]
    log.info(
        "cv@%s: %d folds x %d repeat(s) on cached features, no backbone pass: %.1f s per fold; accuracy %.4f +/- "
        "%.4f (sd), macro F1 %.4f +/- %.4f",
        backbone.name,
        cv["folds"],
        cv["repeats"],
        (time.perf_counter() - start) / runs,
        metrics["accuracy"]["mean"],
        metrics["accuracy"]["sd"],
        metrics["macro_f1"]["mean"],
        metrics["macro_f1"]["sd"],
    )


if __name__ == "__main__":
    main()
