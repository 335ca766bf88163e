"""The one registry of backbones: name -> Keras constructor, its own preprocess_input, minimum size.

Everything that loops over backbones (params validation, dvc.yaml's `foreach` list, tests, predict)
reads `BACKBONES`. Adding a fifth backbone is one entry here and one item in `params.yaml: backbones`.
Keras is imported lazily, so validating params does not pay TensorFlow's start-up cost.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.core.errors import UserError, log
from imgclf.core.io import sha256_file


@dataclass(frozen=True)
class Backbone:
    name: str
    module: str  # keras.applications.<module>, which holds the constructor and preprocess_input
    constructor: str  # class-like function name in that module
    min_size: int  # smallest square input Keras accepts with include_top=False
    imagenet_size: int  # the input size its ImageNet weights were trained at
    notop_file: str  # file name Keras caches the ImageNet weights under (KERAS_HOME/models)

    def build(self, image_size: int, weights: str | None) -> Any:
        """The frozen feature extractor: (B, S, S, 3) preprocessed image -> (B, h, w, C) feature map."""
        module = importlib.import_module(f"keras.applications.{self.module}")
        model = getattr(module, self.constructor)(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
        )
        model.trainable = False
        return model

    def preprocess_input(self) -> Callable[[Any], Any]:
        """Its own preprocessing (VGG: BGR, mean-subtracted 0-255; MobileNet, Xception: [-1, 1])."""
        return importlib.import_module(f"keras.applications.{self.module}").preprocess_input


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone("vgg16", "vgg16", "VGG16", 32, 224, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        Backbone("vgg19", "vgg19", "VGG19", 32, 224, "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        Backbone("mobilenet", "mobilenet", "MobileNet", 32, 224, "mobilenet_1_0_224_tf_no_top.h5"),
        Backbone("xception", "xception", "Xception", 71, 299, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ]
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights: $KERAS_HOME/models, else ~/.keras/models."""
    try:  # Keras decides at import (and falls back to /tmp/.keras when ~ is read-only): ask it
        from keras.src.backend import config

        home = config.keras_home()
    except (ImportError, AttributeError):
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def offline_help(backbone: Backbone) -> str:
    return (
        f"could not obtain ImageNet weights for {backbone.name}: no network and no cached file "
        f"{keras_cache_dir() / backbone.notop_file}. Three ways out: (1) run once on a machine with "
        f"internet so Keras caches the file, then copy it to that path (or set KERAS_HOME); "
        f"(2) set features.weights to the path of a weights file for {backbone.name} without its top; "
        f"(3) set features.weights: none (random initialisation, for smoke runs only)"
    )


def resolve_weights_path(weights: str, backbone: Backbone) -> Path | None:
    """A weights path for `backbone`: `{backbone}` in it is replaced by the name; a folder must hold
    the file under Keras' own name (a copy of a Keras cache works). None when there is no such file."""
    path = Path(weights.replace("{backbone}", backbone.name)).expanduser()
    if path.is_dir():
        path = path / backbone.notop_file
    return path if path.is_file() else None


def build_backbone(backbone: Backbone, image_size: int, weights: str) -> tuple[Any, dict[str, Any]]:
    """Build the frozen backbone with `weights` (imagenet | none | a file path).

    Returns the model and a record of the weights used (recorded with the features). Never falls back
    silently: an unobtainable weights file stops with the three ways out.
    """
    record: dict[str, Any] = {"weights": weights, "weights_sha256": None}
    if weights == "none":
        log.warning(
            "features.weights is none: %s starts from random weights (smoke runs only; "
            "use imagenet or a weights file for real results)",
            backbone.name,
        )
        return backbone.build(image_size, None), record
    if weights == "imagenet":
        try:
            model = backbone.build(image_size, "imagenet")
        except Exception as exc:  # Keras raises a bare Exception("URL fetch failure ...") offline
            text = str(exc)
            if "URL fetch failure" in text or "urlopen" in text or isinstance(exc, OSError):
                raise UserError(offline_help(backbone)) from exc
            raise
        cached = keras_cache_dir() / backbone.notop_file
        if cached.is_file():  # the file's name and hash, not its machine-dependent location
            record["weights_file"] = cached.name
            record["weights_sha256"] = sha256_file(cached)
        return model, record
    path = resolve_weights_path(weights, backbone)
    if path is None:
        raise UserError(
            f"features.weights={weights!r} is not imagenet, none, or an existing file for {backbone.name}; "
            f"give a weights file without its top ({{backbone}} in the path is replaced by the backbone name), "
            f"or a folder holding {backbone.notop_file}"
        )
    try:
        model = backbone.build(image_size, str(path))
    except ValueError as exc:
        raise UserError(f"features.weights={weights!r} does not fit {backbone.name} without its top: {exc}") from exc
    record["weights_file"] = path.name
    record["weights_sha256"] = sha256_file(path)
    return model, record
