"""Explanations that are checked: Grad-CAM beside the head's attention, a model-randomisation sanity check and
deletion/insertion faithfulness scores.

Grad-CAM (Selvaraju et al., 2017) on the frozen backbone's last convolutional block, which is the feature map
the head reads: the gradient of the chosen class's calibrated logit (centred: class_scores) with respect to that
map, averaged over positions, weights its channels; their weighted sum, clipped at zero, is the map (h, w). The
gradient runs through the head (and the temperature) in float32, whatever precision the backbone ran in; for a
fine-tuned model the feature map is the tuned extractor's.

The attention map is what the head's self-attention gives each position (head.model.attention_model).

Sanity check (Adebayo et al., NeurIPS 2018, cascading model randomisation): the head's layers re-initialised
from the top (the output layer first) down, and at each step the Spearman rank correlation between the trained
model's maps and the randomised model's, averaged over images (signed, and absolute: an inverted map has not
become independent of the model). A map that explains the model must change when the model does: a method
passes when the mean absolute correlation with the whole head randomised is below SANITY_THRESHOLD (images whose
trained map is constant have no ranking to compare and are left out, counted). The attention map cannot change
while only layers above the attention are randomised: the cascade shows where it starts to.

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


def class_scores(head: Any, features: Any, temperature: float) -> Any:
    """The calibrated logits, centred (B, K), differentiable: the output layer's input times its kernel plus its
    bias (the logits before the softmax), divided by the temperature, minus their mean over classes. A
    log-probability's gradient shrinks with the model's confidence (by 1 - p), so a confident image's map would
    vanish beside an unsure one's; the centred logit's does not, and it ranks the classes as the calibrated
    probabilities do (temperature scaling divides the logits by T)."""
    tf = _tf()
    output = head.get_layer("probabilities")
    before = tf.cast(_pre_output_model(head)(features, training=False), tf.float32)
    logits = tf.matmul(before, tf.cast(output.kernel, tf.float32)) + tf.cast(output.bias, tf.float32)
    scaled = logits / float(temperature)
    return scaled - tf.reduce_mean(scaled, axis=1, keepdims=True)


_PRE_OUTPUT: dict[int, Any] = {}


def _pre_output_model(head: Any) -> Any:
    """The head up to its output layer's input (cached for the last head asked)."""
    import keras

    key = id(head)
    if key not in _PRE_OUTPUT:
        _PRE_OUTPUT.clear()
        _PRE_OUTPUT[key] = keras.Model(head.input, head.get_layer("probabilities").input)
    return _PRE_OUTPUT[key]


def grad_cam(head: Any, features: np.ndarray, classes: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Grad-CAM maps (B, h, w) float32 >= 0 of feature maps (B, h, w, C) for class index classes[i] of each."""
    tf = _tf()
    maps = []
    for start in range(0, len(features), 64):
        f = tf.convert_to_tensor(np.asarray(features[start : start + 64], dtype=np.float32))
        chosen = tf.convert_to_tensor(np.asarray(classes[start : start + 64], dtype=np.int32))
        with tf.GradientTape() as tape:
            tape.watch(f)
            score = tf.gather(class_scores(head, f, temperature), chosen, batch_dims=1)
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


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two maps (flattened): 1 for identical maps (constant ones included), None when
    the first (the trained model's) is constant and the second differs (no ranking to compare), 0 when only the
    second is constant."""
    from scipy.stats import rankdata

    if np.array_equal(a, b):
        return 1.0
    x, y = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    if x.std() == 0:
        return None
    if y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def randomized(head: Any, layers: list[str], seed: int) -> Any:
    """A copy of the head with `layers` re-initialised as Keras initialises them by default (kernels Glorot
    uniform, seeded; biases and BatchNormalization's beta and moving mean zero, gamma and moving variance one);
    every other weight as trained."""
    import keras

    copy = keras.models.clone_model(head)
    copy.set_weights(head.get_weights())
    for k, name in enumerate(layers):
        try:
            layer = copy.get_layer(name)
        except ValueError:
            continue
        for j, weight in enumerate(layer.weights):
            leaf = weight.path.rsplit("/", 1)[-1]
            if leaf in ("gamma", "moving_variance"):
                value = np.ones(weight.shape, np.float32)
            elif leaf in ("beta", "moving_mean", "bias"):
                value = np.zeros(weight.shape, np.float32)
            else:
                value = keras.initializers.GlorotUniform(seed=seed * 1000 + k * 50 + j)(weight.shape)
            weight.assign(value)
    return copy


def _correlations(trained: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    values = [spearman(a, b) for a, b in zip(trained, other, strict=True)]
    kept = [v for v in values if v is not None]
    return {
        "spearman": round(float(np.mean(kept)), 4) if kept else None,
        "abs_spearman": round(float(np.mean(np.abs(kept))), 4) if kept else None,
        "left_out": len(values) - len(kept),  # constant trained maps: no ranking to compare
    }


def sanity_check(
    head: Any, features: np.ndarray, classes: np.ndarray, temperature: float, seed: int = 0
) -> dict[str, Any]:
    """Cascading randomisation: per step (layers randomised so far, top down), each method's mean Spearman
    correlation with the trained model's maps, and its mean absolute value (a map inverted by randomisation has
    not become independent of it); a method `passes` when the mean absolute correlation with the whole head
    randomised is below SANITY_THRESHOLD."""
    trained = explain_maps(head, features, classes, temperature)
    present = [name for name in CASCADE if name in {layer.name for layer in head.layers}]
    steps = []
    for k in range(1, len(present) + 1):
        maps = explain_maps(randomized(head, present[:k], seed), features, classes, temperature)
        steps.append({"randomized": present[:k], **{m: _correlations(trained[m], maps[m]) for m in METHODS}})
    out: dict[str, Any] = {"threshold": SANITY_THRESHOLD, "images": len(features), "cascade": steps}
    for m in METHODS:
        last = steps[-1][m] if steps else {"abs_spearman": 1.0, "spearman": 1.0}
        full = last["abs_spearman"] if last["abs_spearman"] is not None else 1.0
        out[m] = {"abs_spearman_all_randomized": full, "spearman_all_randomized": last["spearman"],
                  "passes": bool(full < SANITY_THRESHOLD)}  # fmt: skip
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
    for a random order. `predict`: images (N, S, S, 3) 0..255 -> calibrated probabilities (N, K). Pixels of equal
    importance are taken in random order (a map clipped at zero has many), drawn apart from the random order;
    memory is one image's perturbed copies at a time."""
    n, size = len(images), images.shape[1]
    rng = np.random.default_rng(seed)
    counts = np.round(np.linspace(0, size * size, steps + 1)).astype(int)
    names = [*maps, "random"]
    curves = {name: {"deletion": np.zeros((n, steps + 1)), "insertion": np.zeros((n, steps + 1))} for name in names}
    for i in range(n):
        blur = blurred(images[i : i + 1])[0]
        ties, shuffled = rng.random(size * size), rng.permutation(size * size)
        orders = {name: np.lexsort((ties, -upsample(maps[name][i : i + 1], size).ravel())) for name in maps}
        orders["random"] = shuffled
        # The end points are the same for every order: the image itself, black, and the blurred copy.
        ends = predict(np.stack([images[i], np.zeros_like(images[i]), blur]).astype(np.float32))[:, classes[i]]
        inner = counts[1:-1]
        batch = []
        for name in names:
            for c in inner:
                mask = np.zeros(size * size, bool)
                mask[orders[name][:c]] = True
                mask = mask.reshape(size, size, 1)
                batch += [np.where(mask, 0.0, images[i]), np.where(mask, images[i], blur)]
        probs = predict(np.asarray(batch, np.float32))[:, classes[i]].reshape(len(names), len(inner), 2)
        for k, name in enumerate(names):
            curves[name]["deletion"][i] = [ends[0], *probs[k, :, 0], ends[1]]
            curves[name]["insertion"][i] = [ends[2], *probs[k, :, 1], ends[0]]
    out: dict[str, Any] = {
        "steps": steps,
        "images": n,
        "fractions": [round(float(c) / (size * size), 4) for c in counts],
    }
    for name in names:
        means = {kind: curve.mean(axis=0) for kind, curve in curves[name].items()}
        out[name] = {
            kind: {"auc": round(_area(m), 4), "curve": [round(float(v), 4) for v in m]} for kind, m in means.items()
        }
    return out


def explain_files(
    classifier: Any, paths: list[Any], out_dir: Any, batch_size: int = 32, show_images: bool = True
) -> Any:
    """`imgclf explain`: for each readable file (predict's decoding), a panel original | attention | Grad-CAM of
    the predicted class titled with the calibrated probabilities, <out_dir>/<k>_<name>.png (without
    `show_images`, the maps on black: no pixel of the image); and a table (path, predicted, probabilities, error)
    like predict's, returned and written as <out_dir>/explanations.csv."""
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
                [batch[k] if show_images else np.zeros_like(batch[k])],
                {"attention": maps["attention"][k : k + 1], "Grad-CAM": maps["gradcam"][k : k + 1]},
                [f"{classes[chosen[k]]} ({line})"], out_dir / f"{start + i:04d}_{Path(part[i]).stem}.png",
                title=f"{classifier.name}: {Path(part[i]).name}",
            )  # fmt: skip
    table = pd.DataFrame(table_rows(list(paths), probs, errors, classes),
                         columns=["path", "predicted", *probability_columns(classes), "error"])  # fmt: skip
    write_csv(table, out_dir / "explanations.csv")
    return table
