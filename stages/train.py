"""train@<backbone>: fit the attention head on cached features (then, opt-in, fine-tune on images).

    python -m stages.train vgg16 --features data/features/vgg16 --augmented data/augmented/vgg16 \
        --split-dir data/split --train data/balanced/train.csv --model-dir models/vgg16 \
        --live-dir dvclive/train/vgg16 --plot plots/backbones/vgg16/history.png

The training set is the balanced list's features plus, with augment.copies > 0, the cached features of every
row's variants: each class keeps its balanced share, (1 + copies) rows per balanced row.
"""

import argparse
from pathlib import Path

import numpy as np

from imgclf.core.errors import log, stage_main
from imgclf.core.io import atomic_path, read_csv, save_keras, write_json
from imgclf.core.repro import seed_everything
from imgclf.data.augment import AugmentParams
from imgclf.data.images import ImageRecipe
from imgclf.features.backbones import get_backbone
from imgclf.params import load_params, train_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    for name in ("--features", "--augmented", "--split-dir", "--train", "--model-dir", "--live-dir", "--plot"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    backbone = get_backbone(args.backbone)
    tp = train_params(params, backbone.name)
    seed = params["base"]["seed"]
    seed_everything(seed)

    from imgclf.features.device import platform_record
    from imgclf.features.extractor import backbone_of
    from imgclf.features.store import FeatureBatches, FeatureStore, VariantStore
    from imgclf.head.model import build_end_to_end, count_params
    from imgclf.head.training import LiveLogger, build_head, fine_tune, fit_head, image_batches, open_live
    from imgclf.results.calibration import fit_temperature, negative_log_likelihood
    from imgclf.results.plots import history_plot

    store = FeatureStore(args.features)
    train = read_csv(args.train)
    val = read_csv(args.split_dir / "val.csv")
    classes = sorted(set(train.label))
    index = {c: i for i, c in enumerate(classes)}
    mean, variance = store.channel_stats(train)
    if store.feature_shape[0] * store.feature_shape[1] == 1:
        log.warning(
            "train@%s: the feature map is 1x1 at features.image_size=%d, so attention has one position to look at "
            "(its query/key weights cannot learn); use 64 px or more for a spatial map",
            backbone.name,
            store.info["image_size"],
        )
    head = build_head(store.feature_shape, len(classes), tp, mean, variance)
    y_train, y_val = train.label.map(index).to_numpy(), val.label.map(index).to_numpy()
    variants = VariantStore(args.augmented)
    n, copies = len(train), variants.copies
    # Rows by index, read from disk batch by batch: memory does not grow with the dataset (FeatureBatches).
    parts = [(store.array, store.rows(train), y_train)]
    if copies:  # the variants 1..copies of every balanced row, with that row's label
        parts.append((variants.array, variants.rows(train), np.repeat(y_train, copies)))
        log.info("train@%s: %d balanced rows + %d augmented variants", backbone.name, n, n * copies)
    batch_size = tp["batch_size"]
    train_batches = FeatureBatches(parts, batch_size, shuffle_seed=seed)
    val_batches = FeatureBatches([(store.array, store.rows(val), y_val)], batch_size)
    # Fine-tuning transforms live with the strengths the variants were made with (recorded by augment@).
    augment = AugmentParams.from_params(variants.info["augment"]) if copies else None
    recipe = ImageRecipe.from_params(params["data"])
    features_info = store.info
    image_size = features_info["image_size"]
    desc = f"train@{backbone.name}"
    with atomic_path(args.live_dir) as live_tmp, open_live(live_tmp) as live:
        result = fit_head(head, train_batches, val_batches, tp, [LiveLogger(live, desc)])
        history = result["history"]
        extractor = store.extractor()
        full = build_end_to_end(extractor, head, name=f"{backbone.name}_classifier")
        fine = None
        if params["fine_tune"]["layers"] > 0:
            fine = fine_tune(
                full,
                backbone_of(extractor),
                train,
                val,
                root=params["data"]["root"],
                classes=classes,
                image_size=image_size,
                params={**params["fine_tune"], "early_stopping": tp["early_stopping"]},
                seed=seed,
                callbacks=[LiveLogger(live, f"{desc} fine-tune")],
                recipe=recipe,
                augment=augment,
            )
            history = {k: history[k] + fine["history"][k] for k in history}

    # Temperature scaling on the validation split, with the saved model's own probabilities (after fine-tuning,
    # from images: its backbone changed). Recorded in info.json: predict, evaluate and export apply it.
    if tp["calibration"] == "temperature":
        if fine:
            val_images = image_batches(val, params["data"]["root"], classes, image_size, tp["batch_size"], recipe)
            val_probs = full.predict(val_images, verbose=0)
        else:
            val_probs = head.predict(val_batches, verbose=0)
        temperature, status = fit_temperature(val_probs, y_val)
        if status != "fitted":
            log.warning("train@%s: temperature %s; T = 1 (probabilities as the head gives them)", backbone.name, status)
        calibration = {
            "method": "temperature",
            "temperature": temperature,
            "status": status,
            "fitted_on": f"validation split ({len(y_val)} images)",
            "val_log_loss_before": round(negative_log_likelihood(val_probs, y_val, 1.0), 6),
            "val_log_loss_after": round(negative_log_likelihood(val_probs, y_val, temperature), 6),
        }
        log.info(
            "train@%s: temperature %.4f fitted on the validation split (log loss %.4f -> %.4f)",
            backbone.name, temperature, calibration["val_log_loss_before"], calibration["val_log_loss_after"],
        )  # fmt: skip
    else:
        calibration = {"method": "none", "temperature": 1.0}

    # The saved model is the last phase's best epoch: fine-tuning's when it ran, else the head's.
    final = fine or result
    best = final["best_epoch"] - 1
    # Only what the images, params and code determine: no timing (it goes to the log line), so an
    # identical rerun writes identical bytes and DVC sees no change downstream.
    info = {
        "backbone": backbone.name,
        "classes": classes,
        "image_size": image_size,
        "preprocessing": features_info["preprocessing"],
        "image_recipe": recipe.to_dict(),
        "augment": variants.info["augment"] if variants.copies else None,
        "weights": features_info["weights"],
        "weights_sha256": features_info.get("weights_sha256"),
        "precision": features_info.get("precision", "float32"),
        "fine_tuned": fine is not None,
        "fine_tuned_layers": fine["unfrozen_layers"] if fine else [],
        "epochs_run": result["epochs_run"],
        "best_epoch": result["best_epoch"],
        "fine_tune": {"epochs_run": fine["epochs_run"], "best_epoch": fine["best_epoch"]} if fine else None,
        # Of the saved model (after fine-tuning when it ran), on the validation split.
        "best_val_accuracy": round(final["history"]["val_accuracy"][best], 6),
        "best_val_loss": round(final["history"]["val_loss"][best], 6),
        "calibration": calibration,
        "head_params": count_params(head),
        "model_params": count_params(full),
        "train_params": tp,
        # The machines that computed the features and trained the head (not the host: its type).
        "platform": {"features": features_info.get("platform"), "train": platform_record()},
    }
    with atomic_path(args.model_dir) as tmp:
        tmp.mkdir(parents=True)
        save_keras(head, tmp / "head.keras")
        save_keras(full, tmp / "model.keras")
        write_json(tmp / "info.json", info)
    saved_epoch = result["epochs_run"] + fine["best_epoch"] if fine else result["best_epoch"]
    history_plot(history, args.plot, title=backbone.name, best_epoch=saved_epoch)
    log.info(
        "train@%s: %d epochs (best %d), val accuracy %.4f, %.1f s",
        backbone.name,
        result["epochs_run"] + (fine["epochs_run"] if fine else 0),
        saved_epoch,
        info["best_val_accuracy"],
        result["seconds"] + (fine["seconds"] if fine else 0),
    )


if __name__ == "__main__":
    main()
