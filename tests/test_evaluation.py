"""Metrics from probabilities: binary and multi-class, and intervals that contain their point estimate."""

from __future__ import annotations

import numpy as np

from imgclf.evaluation import bootstrap_interval, compute_metrics


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
    ci = bootstrap_interval(y_true, y_pred, n=300, confidence=0.95, seed=1)
    assert ci["accuracy"][0] <= np.mean(y_true == y_pred) <= ci["accuracy"][1]
    assert ci["accuracy"][1] - ci["accuracy"][0] > 0.05  # 80 images cannot pin accuracy down
    assert ci == bootstrap_interval(y_true, y_pred, n=300, confidence=0.95, seed=1)
