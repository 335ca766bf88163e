"""The attention head and the end-to-end model.

    image (B, S, S, 3) 0..255 --extractor (features/extractor.py)--> feature map (B, h, w, C)
    feature map --head--> class probabilities (B, K)

The head is trained on cached feature maps (see features/backbone_pass.py); the end-to-end model joins the extractor
and the head for deployment and fine-tuning. The extractor lives in its own module so that the backbone
pass (features@<bb>) does not depend on the head's code.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers

from imgclf.features.extractor import Preprocess


@keras.saving.register_keras_serializable(package="imgclf")
class Standardize(layers.Layer):
    """Per-channel (x - mean) * inv_std with constants computed in float64 from the training features.

    Keras' Normalization divides by max(std, 1e-7), and BatchNorm/LayerNorm add an epsilon of ~1e-3 to the
    variance: frozen-backbone activations at random init are far smaller (Xception std ~1e-5, MobileNet
    ~1e-20, whose variance even underflows float32), and those layers would flatten them to zero. Here the
    scale is a float32 constant (1e20 is representable), so any non-constant channel comes out at unit scale;
    a constant channel (std 0) comes out as 0.
    """

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channels = channels
        self.mean = self.add_weight(shape=(channels,), initializer="zeros", trainable=False, name="mean")
        self.inv_std = self.add_weight(shape=(channels,), initializer="ones", trainable=False, name="inv_std")

    def set_statistics(self, mean: np.ndarray, variance: np.ndarray) -> None:
        std = np.sqrt(np.asarray(variance, dtype=np.float64))
        inv = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
        self.mean.assign(np.asarray(mean, dtype=np.float32))
        self.inv_std.assign(np.minimum(inv, np.finfo(np.float32).max).astype(np.float32))

    def call(self, x: Any) -> Any:
        return (x - self.mean) * self.inv_std

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "channels": self.channels}


def build_attention_head(
    feature_shape: tuple[int, int, int],
    n_classes: int,
    *,
    token_dim: int = 256,
    heads: int = 4,
    key_dim: int = 32,
    dense_units: int = 128,
    dropout: float = 0.3,
    noise_stddev: float = 0.1,
    feature_mean: np.ndarray | None = None,
    feature_variance: np.ndarray | None = None,
) -> keras.Model:
    """Feature map -> tokens -> self-attention (residual + norm) -> pool -> noise -> dense -> BN -> dropout -> softmax.

    `feature_mean`/`feature_variance` (per channel, from the training features) standardise the inputs
    (see `Standardize`: frozen-backbone activations can be tiny). `token_dim` > 0 projects each token from
    C channels (512-2048) to that width first: attention on 2048-wide Xception tokens made the head cost
    as much per epoch as the backbone pass on small images; 0 keeps C. Works for any feature-map size (h, w).
    """
    h, w, c = feature_shape
    inputs = keras.Input(feature_shape, name="features")  # (B, h, w, C)
    standardize = Standardize(c, name="feature_norm")
    if feature_mean is not None:
        standardize.set_statistics(feature_mean, feature_variance)
    x = standardize(inputs)
    tokens = layers.Reshape((h * w, c), name="tokens")(x)  # (B, T, C), T = h*w spatial positions
    if token_dim:
        tokens = layers.Dense(token_dim, name="token_projection")(tokens)  # (B, T, D)
    attended, _scores = layers.MultiHeadAttention(heads, key_dim, name="attention")(
        tokens, tokens, return_attention_scores=True
    )  # (B, T, D), (B, heads, T, T)
    x = layers.Add(name="residual")([tokens, attended])
    x = layers.LayerNormalization(name="attention_norm")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)  # (B, D)
    x = layers.GaussianNoise(noise_stddev, name="noise")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.BatchNormalization(name="dense_bn")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)  # (B, K)
    return keras.Model(inputs, outputs, name="head")


def attention_model(head: keras.Model) -> keras.Model:
    """Feature map -> attention each spatial position receives, averaged over heads and queries: (B, h, w)."""
    h, w, _ = head.input.shape[1:]
    scores = head.get_layer("attention").output[1]  # (B, heads, T, T)
    received = keras.ops.mean(scores, axis=(1, 2))  # (B, T): mean over heads and query positions
    return keras.Model(head.input, keras.ops.reshape(received, (-1, h, w)), name="attention_map")


def build_end_to_end(extractor: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """Raw image (B, S, S, 3) 0..255 -> class probabilities (B, K): the deployable model."""
    image = keras.Input(extractor.input.shape[1:], name="image")
    return keras.Model(image, head(extractor(image)), name=name)


def count_params(model: keras.Model) -> dict[str, int]:
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    return {"total": int(model.count_params()), "trainable": trainable}


def load_model(path: str) -> keras.Model:
    """Load a saved .keras model (an extractor, a head or both): the imgclf layers are registered here."""
    return keras.saving.load_model(path, compile=False, custom_objects={"Preprocess": Preprocess})
