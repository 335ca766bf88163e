"""Metrics from probabilities: binary and multi-class, and intervals that contain their point estimate."""

from __future__ import annotations

import numpy as np

from imgclf.results.evaluation import compute_metrics
from imgclf.results.significance import bootstrap_interval


def test_binary_and_multiclass_metrics() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    metrics = compute_metrics(["a", "b", "b", "b"], probs, ["a", "b"], n_bootstrap=50, confidence=0.9, seed=0)
    assert metrics["accuracy"] == 0.75 and metrics["roc_auc_ovr_macro"] == 1.0
    three = np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.1 / 3
    metrics = compute_metrics(["a", "b", "c", "c"], three, ["a", "b", "c"], n_bootstrap=50, confidence=0.9, seed=0)
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc_ovr_macro"] == 1.0
    assert metrics["per_class"]["c"]["support"] == 2


def test_bootstrap_interval_contains_the_point_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 80)
    y_pred = np.where(rng.random(80) < 0.7, y_true, rng.integers(0, 3, 80))
    ci = bootstrap_interval(y_true, y_pred, 3, resamples=300, confidence=0.95, seed=1)
    assert ci["accuracy"][0] <= np.mean(y_true == y_pred) <= ci["accuracy"][1]
    assert ci["accuracy"][1] - ci["accuracy"][0] > 0.05  # 80 images cannot pin accuracy down
    assert ci == bootstrap_interval(y_true, y_pred, 3, resamples=300, confidence=0.95, seed=1)


def test_interval_contains_its_estimate_when_a_class_is_never_predicted() -> None:
    """Three classes, one never predicted: the point macro F1 averages over three classes; so must the bootstrap."""
    y_true = np.array([0] * 10 + [1] * 10 + [2] * 10)
    y_pred = np.array([0] * 10 + [1] * 10 + [0] * 5 + [1] * 5)
    probs = np.eye(3)[y_pred] * 0.8 + 0.2 / 3
    metrics = compute_metrics(list(np.array(["a", "b", "c"])[y_true]), probs, ["a", "b", "c"], 400, 0.95, 0)
    low, high = metrics["ci"]["macro_f1"]
    assert low <= metrics["macro"]["f1"] <= high


def test_ensemble_is_renormalised_and_refuses_models_with_other_classes(tmp_path) -> None:
    import pytest

    from imgclf.core.errors import UserError
    from imgclf.results.compare import ensemble_probabilities
    from imgclf.results.evaluation import write_predictions

    probs = np.array([[0.6, 0.4], [0.3, 0.7]]) * 1.01  # off by 1%: written as is
    write_predictions(tmp_path / "a.csv", ["x", "y"], ["0", "1"], probs, ["0", "1"])
    write_predictions(tmp_path / "b.csv", ["x", "y"], ["0", "1"], probs[:, ::-1], ["0", "1"])
    _, classes, mean = ensemble_probabilities([tmp_path / "a.csv", tmp_path / "b.csv"])
    assert classes == ["0", "1"]
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, atol=1e-12)
    write_predictions(tmp_path / "c.csv", ["x", "y"], ["0", "1"], probs, ["0", "10"])
    with pytest.raises(UserError, match="trained on different data"):
        ensemble_probabilities([tmp_path / "a.csv", tmp_path / "c.csv"])


def test_a_missing_features_directory_is_a_one_line_error(tmp_path) -> None:
    import pytest

    from imgclf.core.errors import UserError
    from imgclf.features.store import FeatureStore

    with pytest.raises(UserError, match=r"run `dvc repro features@vgg16` first"):
        FeatureStore(tmp_path / "vgg16")
