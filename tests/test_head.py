"""The attention head: any feature-map size, no NaN, gradients reach every trainable weight,
tiny backbone activations are standardised rather than flattened."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from imgclf.head.model import attention_model, build_attention_head


@pytest.mark.parametrize(("shape", "scale"), [((1, 2, 8), 1.0), ((2, 3, 16), 1.0), ((3, 3, 32), 1e-20)])
def test_head_outputs_probabilities_and_every_weight_gets_a_gradient(shape, scale) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(16, *shape)) * scale).astype("float32")
    y = rng.integers(0, 3, 16)
    stats = {"feature_mean": x.mean((0, 1, 2)), "feature_variance": x.var((0, 1, 2))}
    head = build_attention_head(shape, 3, token_dim=6, heads=2, key_dim=4, dense_units=8, **stats)
    probs = head.predict(x, verbose=0)
    assert probs.shape == (16, 3)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    with tf.GradientTape() as tape:
        loss = tf.keras.losses.sparse_categorical_crossentropy(y, head(x, training=True))
    grads = tape.gradient(loss, head.trainable_weights)
    names = [w.path for w in head.trainable_weights]
    assert {n.split("/")[0] for n in names} >= {"token_projection", "attention", "dense", "dense_bn", "probabilities"}
    for name, grad in zip(names, grads, strict=True):
        assert grad is not None, f"no gradient reaches {name}"
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0, f"zero or NaN gradient at {name}"


def test_single_position_feature_map_still_gives_probabilities() -> None:
    """VGG at 32 px gives a 1x1 map: attention over one token is constant (query/key cannot learn; train
    warns), but the head must still work."""
    head = build_attention_head((1, 1, 8), 3)
    probs = head.predict(np.random.default_rng(4).normal(size=(4, 1, 1, 8)), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_tiny_features_are_standardised_not_flattened() -> None:
    """MobileNet at random init gives activations ~1e-20; Keras' Normalization would flatten them to 0."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(32, 2, 2, 8)) * 1e-20).astype("float32")
    head = build_attention_head((2, 2, 8), 2, feature_mean=x.mean((0, 1, 2)), feature_variance=x.var((0, 1, 2)))
    standardised = np.asarray(head.get_layer("feature_norm")(x))
    assert 0.5 < standardised.std() < 2.0


def test_head_learns_what_a_linear_probe_learns() -> None:
    """Two classes separated along one channel: the head must fit them (a linear model can)."""
    from imgclf.features.store import FeatureBatches
    from imgclf.head.training import fit_head

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 2, 2, 8)).astype("float32") * 1e-5
    x[..., 0] += (y[:, None, None] * 2 - 1) * 1e-5
    head = build_attention_head((2, 2, 8), 2, feature_mean=x.mean((0, 1, 2)), feature_variance=x.var((0, 1, 2)))
    params = {"lr": 3e-3, "epochs": 30, "batch_size": 32, "early_stopping": {"monitor": "val_loss", "patience": 5}}
    train = FeatureBatches([(x, np.arange(150), y[:150])], 32, shuffle_seed=0)
    val = FeatureBatches([(x, np.arange(150, 200), y[150:])], 32)
    result = fit_head(head, train, val, params)
    assert max(result["history"]["val_accuracy"]) >= 0.9


def test_attention_map_covers_the_spatial_positions() -> None:
    head = build_attention_head((3, 4, 8), 2, heads=2, key_dim=4)
    maps = attention_model(head).predict(np.random.default_rng(3).normal(size=(5, 3, 4, 8)), verbose=0)
    assert maps.shape == (5, 3, 4)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)  # softmax over keys, averaged
