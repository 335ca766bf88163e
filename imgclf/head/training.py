"""Fit the attention head on cached features, then (opt-in) fine-tune the top of the backbone on images."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from imgclf.core.logs import log
from imgclf.data.augment import AugmentParams, random_transform
from imgclf.data.images import DEFAULT_RECIPE, ImageRecipe
from imgclf.features.backbone_pass import load_or_stop
from imgclf.features.store import FeatureBatches

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


class LiveLogger(keras.callbacks.Callback):
    """Log loss and accuracy (train and validation) per epoch to a dvclive.Live, one step per epoch, and
    one line per epoch to stderr and the run log (`train@vgg16 epoch 3/60: loss 0.41 ...`)."""

    def __init__(self, live: Any, desc: str = "train") -> None:
        super().__init__()
        self.live, self.desc = live, desc
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        for key in HISTORY_KEYS:
            if key in logs:
                self.live.log_metric(key, float(logs[key]))
        self.live.next_step()
        log.info(
            "%s epoch %d/%d: %s (%.1f s)",
            self.desc, epoch + 1, self.params.get("epochs", 0),
            ", ".join(f"{k} {logs[k]:.4f}" for k in HISTORY_KEYS if k in logs), time.perf_counter() - self.start,
        )  # fmt: skip


def history_lists(history: Any) -> dict[str, list[float]]:
    """Keras History -> {loss, accuracy, val_loss, val_accuracy: per-epoch floats}."""
    return {k: [float(v) for v in history.history[k]] for k in HISTORY_KEYS}


def open_live(directory: str | Path) -> Any:
    """A dvclive.Live that only logs: it does not touch dvc.yaml (declared by hand) nor save experiments."""
    from scmrepo.exceptions import SCMError

    from dvclive import Live
    from imgclf.core.errors import UserError

    try:
        return Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False)
    except SCMError as exc:  # dvclive 3.49 fails in a git repository without commits
        raise UserError(
            f"dvclive cannot log in this git repository ({exc}); make a first commit "
            "(git add -A && git commit -m 'start') and run again"
        ) from exc


def compile_model(model: keras.Model, lr: float, loss_scale: bool = False) -> None:
    """Adam + sparse cross-entropy; with `loss_scale` (a float16 backbone being fine-tuned), Keras' dynamic
    loss scaling, which keeps float16 gradients from underflowing."""
    optimizer = keras.optimizers.Adam(learning_rate=lr)
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(optimizer) if loss_scale else optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def best_epoch_keeper(early_stopping: dict[str, Any]) -> keras.callbacks.EarlyStopping:
    """EarlyStopping on `train.early_stopping`'s monitor and patience, restoring the best epoch's weights at the
    end (Keras 3 restores them whether or not training stopped early)."""
    return keras.callbacks.EarlyStopping(
        monitor=early_stopping["monitor"], patience=early_stopping["patience"], restore_best_weights=True
    )


def build_head(
    feature_shape: tuple[int, int, int],
    n_classes: int,
    params: dict[str, Any],
    feature_mean: np.ndarray,
    feature_variance: np.ndarray,
) -> keras.Model:
    """The attention head as `params` (one backbone's train section, params.train_params) shapes it, with the
    per-channel standardisation of its training rows: the one place train@ and cv@ build it."""
    from imgclf.head.model import build_attention_head

    return build_attention_head(
        feature_shape,
        n_classes,
        token_dim=params["token_dim"],
        heads=params["heads"],
        key_dim=params["key_dim"],
        dense_units=params["dense_units"],
        dropout=params["dropout"],
        noise_stddev=params["noise_stddev"],
        feature_mean=feature_mean,
        feature_variance=feature_variance,
    )


def fit_head(
    head: keras.Model,
    train: FeatureBatches,
    val: FeatureBatches,
    params: dict[str, Any],
    callbacks: list[keras.callbacks.Callback] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Adam + sparse cross-entropy; EarlyStopping restores the best weights. Returns the history, the epochs
    run and the best epoch (the timing, which varies run to run, is returned apart: `seconds`)."""
    compile_model(head, params["lr"])
    stopper = best_epoch_keeper(params["early_stopping"])
    start = time.perf_counter()
    history = head.fit(
        train,
        validation_data=val,
        shuffle=False,  # FeatureBatches shuffles itself, seeded; Keras would also reorder its batches
        epochs=params["epochs"],
        callbacks=[stopper, *callbacks],
        verbose=0,  # the LiveLogger writes one line per epoch
    )
    return {
        "history": history_lists(history),
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(stopper.best_epoch) + 1,
        "seconds": round(time.perf_counter() - start, 2),
    }


class ImageBatches(keras.utils.PyDataset):
    """Raw image batches (B, S, S, 3) 0..255 with integer labels, loaded by the shared load_image."""

    def __init__(
        self,
        paths: list[Path],
        labels: np.ndarray,
        image_size: int,
        batch_size: int,
        shuffle_seed: int | None = None,
        recipe: ImageRecipe = DEFAULT_RECIPE,
        augment: AugmentParams | None = None,
    ) -> None:
        super().__init__()
        self.paths, self.labels, self.recipe, self.augment = paths, labels, recipe, augment
        self.epoch = 0
        self.image_size, self.batch_size = image_size, batch_size
        self.order = np.arange(len(paths))
        self.seed = shuffle_seed or 0
        self.rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = [load_or_stop(self.paths[i], self.image_size, self.recipe) for i in rows]
        if self.augment is not None:  # live: a new random variant of every image in every epoch, seeded
            rng = np.random.default_rng([self.seed, self.epoch, index])
            images = [random_transform(image, rng, self.augment) for image in images]
        return np.stack(images), self.labels[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.rng is not None:
            self.order = self.rng.permutation(len(self.paths))


def image_batches(
    frame: pd.DataFrame,
    root: str | Path,
    classes: list[str],
    image_size: int,
    batch_size: int,
    recipe: ImageRecipe = DEFAULT_RECIPE,
    shuffle_seed: int | None = None,
    augment: AugmentParams | None = None,
) -> ImageBatches:
    """The images of a split's rows (path under `root`, label), as batches for an end-to-end model."""
    index = {c: i for i, c in enumerate(classes)}
    paths = [Path(root) / p for p in frame.path]
    return ImageBatches(paths, frame.label.map(index).to_numpy(), image_size, batch_size, shuffle_seed, recipe, augment)


def unfreeze_top(backbone: keras.Model, layers: int) -> list[str]:
    """Make the top `layers` layers of the backbone trainable; BatchNormalization layers stay frozen
    (and, since the backbone is called with training=False, in inference mode). Returns their names."""
    backbone.trainable = True
    names = []
    for i, layer in enumerate(backbone.layers):
        top = i >= len(backbone.layers) - layers
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            names.append(layer.name)
    return names


def fine_tune(
    full: keras.Model,
    backbone: keras.Model,
    train: pd.DataFrame,
    val: pd.DataFrame,
    root: str | Path,
    classes: list[str],
    image_size: int,
    params: dict[str, Any],
    seed: int,
    callbacks: list[keras.callbacks.Callback] = (),  # type: ignore[assignment]
    recipe: ImageRecipe = DEFAULT_RECIPE,
    augment: AugmentParams | None = None,
) -> dict[str, Any]:
    """Train end to end on images with a tiny learning rate, the top `params['layers']` backbone layers unfrozen,
    stopping early on `params['early_stopping']` (train's) and keeping the best fine-tuning epoch's weights.
    With `augment`, the training images get the same random transforms as the offline variants, live (the
    backbone runs every epoch here anyway); validation images never do."""
    from imgclf.features.device import model_precision

    unfrozen = unfreeze_top(backbone, params["layers"])
    compile_model(full, params["lr"], loss_scale=model_precision(backbone) == "float16")

    def data(frame: pd.DataFrame, shuffle_seed: int | None, live: AugmentParams | None) -> ImageBatches:
        return image_batches(frame, root, classes, image_size, params["batch_size"], recipe, shuffle_seed, live)

    stopper = best_epoch_keeper(params["early_stopping"])
    start = time.perf_counter()
    history = full.fit(
        data(train, seed, augment),
        validation_data=data(val, None, None),
        epochs=params["epochs"],
        callbacks=[stopper, *callbacks],
        verbose=0,
    )
    backbone.trainable = False
    return {
        "history": history_lists(history),
        "unfrozen_layers": unfrozen,
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(stopper.best_epoch) + 1,
        "seconds": round(time.perf_counter() - start, 2),
    }
