"""Explanations that are checked: Grad-CAM beside the head's attention, a model-randomisation sanity check and
deletion/insertion faithfulness scores.

Grad-CAM (Selvaraju et al., 2017) on the frozen backbone's last convolutional block, which is the feature map
the head reads: the gradient of the chosen class's calibrated log-probability with respect to that map, averaged
over positions, weights its channels; their weighted sum, clipped at zero, is the map (h, w). The gradient runs
through the head (and the temperature) in float32, whatever precision the backbone ran in; for a fine-tuned model
the feature map is the tuned extractor's.

The attention map is what the head's self-attention gives each position (head.model.attention_model).

Sanity check (Adebayo et al., NeurIPS 2018, cascading model randomisation): the head's layers re-initialised
from the top (the output layer first) down, and at each step the Spearman rank correlation between the trained
model's maps and the randomised model's, averaged over images. A map that explains the model must change when
the model does: a method passes when the correlation with the whole head randomised is below
SANITY_THRESHOLD. The attention map cannot change while only layers above the attention are randomised: the
cascade shows where it starts to.

Faithfulness (Petsiuk et al., RISE, BMVC 2018): deletion removes the most important pixels first (to black) and
records the calibrated probability of the predicted class as they go; insertion reveals them first, from a
blurred copy. The area under each curve (fraction of pixels 0..1, trapezoids) per method, against a random
order: a faithful map has a lower deletion area and a higher insertion area than random.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

SANITY_THRESHOLD = 0.5  # mean Spearman correlation below which the maps changed (Adebayo et al.'s criterion)
# The head's layers with weights, from the output down: the cascade's order.
CASCADE = ("probabilities", "dense_bn", "dense", "attention_norm", "attention", "token_projection")
METHODS = ("gradcam", "attention")


def _tf() -> Any:
    import tensorflow as tf

    return tf


def calibrated_log_probabilities(head: Any, features: Any, temperature: float) -> Any:
    """log of the calibrated probabilities (B, K), differentiable: log-softmax of log(p) / T."""
    tf = _tf()
    probs = tf.cast(head(features, training=False), tf.float32)
    scaled = tf.math.log(tf.clip_by_value(probs, 1e-30, 1.0)) / float(temperature)
    return scaled - tf.reduce_logsumexp(scaled, axis=1, keepdims=True)


def grad_cam(head: Any, features: np.ndarray, classes: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Grad-CAM maps (B, h, w) float32 >= 0 of feature maps (B, h, w, C) for class index classes[i] of each."""
    tf = _tf()
    maps = []
    for start in range(0, len(features), 64):
        f = tf.convert_to_tensor(np.asarray(features[start : start + 64], dtype=np.float32))
        chosen = tf.convert_to_tensor(np.asarray(classes[start : start + 64], dtype=np.int32))
        with tf.GradientTape() as tape:
            tape.watch(f)
            score = tf.gather(calibrated_log_probabilities(head, f, temperature), chosen, batch_dims=1)
        grads = tape.gradient(score, f)  # (B, h, w, C)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        maps.append(tf.nn.relu(tf.reduce_sum(weights * f, axis=-1)).numpy())
    return np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *features.shape[1:3]), np.float32)


def attention_maps(head: Any, features: np.ndarray) -> np.ndarray:
    """The head's attention maps (B, h, w), called directly in batches of 64: the sanity check builds a model per
    randomised head, and Keras' predict() would trace a new graph for each (and warn about it)."""
    from imgclf.head.model import attention_model

    model = attention_model(head)
    parts = [np.asarray(model(features[k : k + 64], training=False)) for k in range(0, len(features), 64)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, *features.shape[1:3]), np.float32)


def explain_maps(head: Any, features: np.ndarray, classes: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    return {"gradcam": grad_cam(head, features, classes, temperature), "attention": attention_maps(head, features)}


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """(B, h, w) -> (B, size, size), bilinear, as the overlays are drawn."""
    tf = _tf()
    resized = tf.image.resize(np.asarray(maps, np.float32)[..., None], (size, size), method="bilinear")
    return resized.numpy()[..., 0]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened); 0 when either is constant (no ranking to agree on)."""
    from scipy.stats import rankdata

    x, y = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def randomized(head: Any, layers: list[str], seed: int) -> Any:
    """A copy of the head with `layers` re-initialised (kernels and biases by their own initializers, with a
    seed; BatchNormalization back to its starting statistics); every other weight as trained."""
    import keras

    copy = keras.models.clone_model(head)
    copy.set_weights(head.get_weights())
    rng = np.random.default_rng(seed)
    for name in layers:
        try:
            layer = copy.get_layer(name)
        except ValueError:
            continue
        for weight in layer.weights:
            leaf = weight.path.rsplit("/", 1)[-1]
            if leaf in ("gamma", "moving_variance"):
                value = np.ones(weight.shape, np.float32)
            elif leaf in ("beta", "moving_mean", "bias"):
                value = np.zeros(weight.shape, np.float32)
            else:  # kernels: Glorot uniform, as Keras initialises Dense and attention projections
                fan_in = int(np.prod(weight.shape[:-1])) if len(weight.shape) > 1 else int(weight.shape[0])
                fan_out = int(weight.shape[-1])
                limit = np.sqrt(6.0 / max(1, fan_in + fan_out))
                value = rng.uniform(-limit, limit, weight.shape).astype(np.float32)
            weight.assign(value)
    return copy


def sanity_check(
    head: Any, features: np.ndarray, classes: np.ndarray, temperature: float, seed: int = 0
) -> dict[str, Any]:
    """Cascading randomisation: per step (layers randomised so far, top down), the mean Spearman correlation of
    each method's maps with the trained model's; `passes` when the whole head randomised gives less than
    SANITY_THRESHOLD."""
    trained = explain_maps(head, features, classes, temperature)
    present = [name for name in CASCADE if name in {layer.name for layer in head.layers}]
    steps = []
    for k in range(1, len(present) + 1):
        model = randomized(head, present[:k], seed)
        maps = explain_maps(model, features, classes, temperature)
        steps.append(
            {
                "randomized": present[:k],
                **{m: round(float(np.mean([spearman(a, b) for a, b in zip(trained[m], maps[m], strict=True)])), 4)
                   for m in METHODS},
            }
        )  # fmt: skip
    out: dict[str, Any] = {"threshold": SANITY_THRESHOLD, "images": len(features), "cascade": steps}
    for m in METHODS:
        full = steps[-1][m] if steps else 1.0
        out[m] = {"spearman_all_randomized": full, "passes": bool(full < SANITY_THRESHOLD)}
    return out


def blurred(images: np.ndarray, radius: float = 8.0) -> np.ndarray:
    from PIL import Image, ImageFilter

    out = [np.asarray(Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)))
           for im in images]  # fmt: skip
    return np.asarray(out, np.float32)


def _area(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoids)."""
    xs = np.linspace(0.0, 1.0, len(curve))
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(xs)) / 2)


def deletion_insertion(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    maps: dict[str, np.ndarray],
    classes: np.ndarray,
    steps: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Deletion and insertion curves (mean over images) and their areas, for each map in `maps` (B, h, w) and
    for a random order. `predict`: images (N, S, S, 3) 0..255 -> calibrated probabilities (N, K)."""
    n, size = len(images), images.shape[1]
    rng = np.random.default_rng(seed)
    # Most important first; pixels of equal importance (a map clipped at zero has many) in random order, not in
    # raster order, which would delete the top rows first whatever the map says.
    ties = rng.random((n, size * size))
    orders = {
        name: np.lexsort((ties, -upsample(m, size).reshape(n, -1)), axis=1) for name, m in maps.items()
    }  # fmt: skip
    orders["random"] = np.argsort(ties, axis=1)
    blur = blurred(images)
    counts = np.round(np.linspace(0, size * size, steps + 1)).astype(int)
    out: dict[str, Any] = {
        "steps": steps,
        "images": n,
        "fractions": [round(float(c) / (size * size), 4) for c in counts],
    }
    for name, order in orders.items():
        curves = {"deletion": np.zeros((n, steps + 1)), "insertion": np.zeros((n, steps + 1))}
        for i in range(n):
            batch_del, batch_ins = [], []
            for c in counts:
                mask = np.zeros(size * size, bool)
                mask[order[i, :c]] = True
                mask = mask.reshape(size, size, 1)
                batch_del.append(np.where(mask, 0.0, images[i]))
                batch_ins.append(np.where(mask, images[i], blur[i]))
            probs = predict(np.asarray(batch_del + batch_ins, np.float32))[:, classes[i]]
            curves["deletion"][i], curves["insertion"][i] = probs[: steps + 1], probs[steps + 1 :]
        means = {kind: curve.mean(axis=0) for kind, curve in curves.items()}
        out[name] = {
            kind: {"auc": round(_area(m), 4), "curve": [round(float(v), 4) for v in m]} for kind, m in means.items()
        }
    return out


def explain_files(classifier: Any, paths: list[Any], out_dir: Any, batch_size: int = 32) -> Any:
    """`imgclf explain`: for each readable file (predict's decoding), a panel original | attention | Grad-CAM of
    the predicted class titled with the calibrated probabilities, <out_dir>/<k>_<name>.png; and a table (path,
    predicted, probabilities, error) like predict's, returned and written as <out_dir>/explanations.csv."""
    from pathlib import Path

    import pandas as pd

    from imgclf.core.io import write_csv
    from imgclf.data.images import try_load_image
    from imgclf.results.evaluation import probability_columns
    from imgclf.results.plots import explanation_panels
    from imgclf.results.predict import table_rows

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes, probs, errors = classifier.classes, {}, {}
    for start in range(0, len(paths), batch_size):
        part = paths[start : start + batch_size]
        loaded = [try_load_image(p, classifier.image_size, classifier.recipe) for p in part]
        errors.update({p: reason for p, (_, reason) in zip(part, loaded, strict=True) if reason})
        good = [i for i, p in enumerate(part) if p not in errors]
        if not good:
            continue
        batch = np.stack([loaded[i][0] for i in good])
        features = np.asarray(classifier.extractor.predict_on_batch(batch), np.float32)
        calibrated = classifier.calibrate(classifier.head.predict_on_batch(features))
        chosen = calibrated.argmax(axis=1)
        maps = explain_maps(classifier.head, features, chosen, classifier.temperature)
        for k, i in enumerate(good):
            probs[part[i]] = calibrated[k]
            line = ", ".join(f"{c} {v:.3f}" for c, v in zip(classes, calibrated[k], strict=True))
            explanation_panels(
                [batch[k]], {"attention": maps["attention"][k : k + 1], "Grad-CAM": maps["gradcam"][k : k + 1]},
                [f"{classes[chosen[k]]} ({line})"], out_dir / f"{start + i:04d}_{Path(part[i]).stem}.png",
                title=f"{classifier.name}: {Path(part[i]).name}",
            )  # fmt: skip
    table = pd.DataFrame(table_rows(list(paths), probs, errors, classes),
                         columns=["path", "predicted", *probability_columns(classes), "error"])  # fmt: skip
    write_csv(table, out_dir / "explanations.csv")
    return table
