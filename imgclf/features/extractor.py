"""The frozen feature extractor: raw RGB image -> the backbone's own preprocessing -> feature map.

    image (B, S, S, 3) 0..255 --Preprocess--> backbone (frozen) --> feature map (B, h, w, C) float32

features@<bb> builds it once, runs it over every image and saves it beside the features, so the
end-to-end model (head/model.py) uses the very backbone that made the training features. The backbone may
compute in bfloat16 or float16 (built under a Keras mixed-precision policy, see device.py); preprocessing
runs in float32 and the feature map leaves the extractor as float32 whatever the backbone's precision.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from imgclf.features.backbones import get_backbone


@keras.saving.register_keras_serializable(package="imgclf")
class Preprocess(layers.Layer):
    """Raw RGB 0..255 -> what the backbone expects: its own preprocess_input, or x/255 ("rescale")."""

    def __init__(self, backbone: str, mode: str = "backbone", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("backbone", "rescale"):
            raise ValueError(f"preprocessing must be 'backbone' or 'rescale'. Received: mode={mode!r}")
        self.backbone = backbone
        self.mode = mode

    def call(self, images: Any) -> Any:
        if self.mode == "rescale":
            return images / 255.0
        return get_backbone(self.backbone).preprocess_input()(images)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone, "mode": self.mode}


def build_extractor(backbone_model: keras.Model, backbone: str, image_size: int, mode: str) -> keras.Model:
    """Raw image (B, S, S, 3) -> feature map (B, h, w, C) float32, the backbone run in inference mode (in the
    precision it was built with)."""
    image = keras.Input((image_size, image_size, 3), name="image")
    x = Preprocess(backbone, mode, name="preprocess", dtype="float32")(image)
    x = backbone_model(x, training=False)
    features = layers.Activation("linear", dtype="float32", name="features_float32")(x)
    return keras.Model(image, features, name=f"{backbone}_extractor")


def load_extractor(path: str) -> keras.Model:
    """Load an extractor saved by features@<bb> (extractor.keras), without the head's code."""
    return keras.saving.load_model(path, compile=False, custom_objects={"Preprocess": Preprocess})


def backbone_of(extractor: keras.Model) -> keras.Model:
    """The backbone model nested in an extractor (or in an end-to-end model's extractor)."""
    nested = [layer for layer in extractor.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one nested backbone model in {extractor.name}. Received: {len(nested)}")
    return nested[0]
