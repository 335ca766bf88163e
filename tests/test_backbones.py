"""The backbone registry: every entry builds, gives the expected feature map, and resolves weights honestly."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest

from imgclf.core.errors import UserError
from imgclf.features.backbones import BACKBONES, build_backbone, get_backbone

# Feature map (h, w, C) at each backbone's minimum input size. Every registry entry must be listed.
EXPECTED_AT_MIN_SIZE = {
    "vgg16": (1, 1, 512),
    "vgg19": (1, 1, 512),
    "mobilenet": (1, 1, 1024),
    "xception": (3, 3, 2048),
}


def test_every_registered_backbone_has_an_expected_shape() -> None:
    assert set(EXPECTED_AT_MIN_SIZE) == set(BACKBONES)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_builds_frozen_at_its_minimum_size(name: str) -> None:
    from imgclf.features.extractor import build_extractor

    backbone = get_backbone(name)
    model, record = build_backbone(backbone, backbone.min_size, "none")
    assert record == {"weights": "none", "weights_sha256": None}
    assert not model.trainable_weights
    extractor = build_extractor(model, name, backbone.min_size, "backbone")
    images = np.random.default_rng(0).uniform(0, 255, (2, backbone.min_size, backbone.min_size, 3))
    features = extractor.predict_on_batch(images.astype("float32"))
    assert features.shape == (2, *EXPECTED_AT_MIN_SIZE[name])
    assert np.isfinite(features).all()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_preprocessing_is_its_own(name: str) -> None:
    """VGG: BGR with ImageNet means subtracted (0-255 scale); MobileNet, Xception: [-1, 1]; rescale: x/255."""
    from imgclf.features.extractor import Preprocess

    rgb = np.zeros((1, 4, 4, 3), dtype="float32")
    rgb[..., :] = [10.0, 100.0, 200.0]  # channels differ, so an RGB/BGR slip or a wrong mean shows
    out = np.asarray(Preprocess(name, "backbone")(rgb))[0, 0, 0]
    if name.startswith("vgg"):  # BGR order, ImageNet channel means (B 103.939, G 116.779, R 123.68) subtracted
        np.testing.assert_allclose(out, [200 - 103.939, 100 - 116.779, 10 - 123.68], rtol=1e-5)
    else:  # RGB order, x / 127.5 - 1
        np.testing.assert_allclose(out, [10 / 127.5 - 1, 100 / 127.5 - 1, 200 / 127.5 - 1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(Preprocess(name, "rescale")(rgb))[0, 0, 0], [10 / 255, 100 / 255, 200 / 255])


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match="unknown backbone 'resnet50'; known backbones: vgg16, vgg19"):
        get_backbone("resnet50")


def test_missing_weights_file_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is not imagenet, none, or an existing file for vgg16"):
        build_backbone(get_backbone("vgg16"), 32, str(tmp_path / "nowhere.h5"))


def test_weights_file_is_loaded_and_its_hash_recorded(tmp_path: Path) -> None:
    backbone = get_backbone("vgg16")
    source, _ = build_backbone(backbone, 32, "none")
    path = tmp_path / "vgg16.weights.h5"
    source.save_weights(path)
    model, record = build_backbone(backbone, 32, str(tmp_path / "{backbone}.weights.h5"))
    assert record["weights_file"] == path.name and len(record["weights_sha256"]) == 64  # no machine-specific path
    for a, b in zip(source.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_imagenet_without_network_or_cache_gives_three_ways_out(monkeypatch, tmp_path: Path) -> None:
    from keras.src.backend import config
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras_home"))  # an empty cache
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    with pytest.raises(UserError) as info:
        build_backbone(get_backbone("mobilenet"), 32, "imagenet")
    message = str(info.value)
    assert "no network and no cached file" in message
    assert str(tmp_path / "keras_home" / "models" / "mobilenet_1_0_224_tf_no_top.h5") in message
    assert "Three ways out" in message and "features.weights: none" in message and "path of a weights file" in message
