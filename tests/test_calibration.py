"""Temperature scaling and the calibration numbers (imgclf/results/calibration.py), on constructed classifiers
whose miscalibration is known."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.results.calibration import (
    T_MAX,
    T_MIN,
    apply_temperature,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    reliability_table,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def calibrated_world(n: int = 4000, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class distribution, and labels drawn from it: calibrated by design."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, k))
    probs = softmax(logits)
    y = np.array([rng.choice(k, p=p) for p in probs])
    return logits, y


def test_an_over_confident_classifier_gets_a_temperature_above_one_and_a_lower_ece() -> None:
    logits, y = calibrated_world()
    over = softmax(3.0 * logits)  # the same ranking, three times too sharp
    t, status = fit_temperature(over, y)
    assert status == "fitted" and t == pytest.approx(3.0, rel=0.1)
    after = apply_temperature(over, t)
    assert expected_calibration_error(after, y, 15) < 0.5 * expected_calibration_error(over, y, 15)
    assert brier_score(after, y) < brier_score(over, y)


def test_an_under_confident_classifier_gets_a_temperature_below_one() -> None:
    logits, y = calibrated_world(seed=1)
    under = softmax(0.5 * logits)
    assert fit_temperature(under, y)[0] == pytest.approx(0.5, rel=0.1)


def test_a_calibrated_classifier_keeps_a_temperature_near_one() -> None:
    logits, y = calibrated_world(seed=2)
    assert fit_temperature(softmax(logits), y)[0] == pytest.approx(1.0, abs=0.08)


def test_temperature_one_leaves_probabilities_unchanged() -> None:
    probs = softmax(np.random.default_rng(3).normal(size=(50, 3))).astype(np.float32)
    assert np.array_equal(apply_temperature(probs, 1.0), probs.astype(np.float64))


@pytest.mark.parametrize("t", [0.05, 0.3, 0.9, 1.7, 5.0, T_MAX])
def test_the_predicted_class_never_changes(t: float) -> None:
    rng = np.random.default_rng(4)
    probs = softmax(rng.normal(0, 4, size=(500, 5)))
    scaled = apply_temperature(probs, t)
    assert np.array_equal(scaled.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-12)


def test_fitting_is_deterministic_and_bounded() -> None:
    logits, y = calibrated_world(n=300, seed=5)
    over = softmax(4.0 * logits)
    first = fit_temperature(over, y)
    assert first == fit_temperature(over.copy(), y.copy())  # a fixed bracket, no random start
    assert T_MIN < first[0] < T_MAX


@pytest.mark.parametrize(
    ("probs", "y", "reason"),
    [
        # All correct: the log loss keeps falling as T -> 0; a near-zero T would turn 60/40 into 100/0.
        (np.array([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1]]), np.array([0, 1, 0]), "no validation image is misclassified"),
        (np.array([[np.nan, np.nan], [0.2, 0.8]]), np.array([0, 0]), "not all finite"),
        (np.empty((0, 3)), np.empty(0, dtype=int), "no validation images"),
        # One confident error among many sure rights: the best T sharpens past the lower bound.
        (np.array([[0.51, 0.49]] * 50 + [[0.49, 0.51]]), np.array([0] * 50 + [0]), "ran to its bound"),
    ],
)
def test_a_split_that_cannot_tell_a_temperature_leaves_t_at_one(probs: np.ndarray, y: np.ndarray, reason: str) -> None:
    t, status = fit_temperature(probs, y)
    assert t == 1.0 and status.startswith("not fitted") and reason in status


def test_ece_and_brier_on_a_hand_computed_example() -> None:
    # Top-label confidences 0.9, 0.9, 0.6, 0.6 (bins (0.8667, 0.9333] and (0.5333, 0.6]); correct: yes, no, yes, yes.
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 0, 0, 1])
    # Bin of 0.9: accuracy 1/2, confidence 0.9 -> gap 0.4; bin of 0.6: accuracy 1, confidence 0.6 -> gap 0.4.
    assert expected_calibration_error(probs, y, 15) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    # Brier: (0.01 + 0.01) + (0.81 + 0.81) + (0.16 + 0.16) + (0.16 + 0.16) = 2.28, over 4 rows.
    assert brier_score(probs, y) == pytest.approx(2.28 / 4)
    table = reliability_table(probs, y, 15)
    assert [(r["images"], r["confidence"], r["accuracy"]) for r in table] == [(2, 0.6, 1.0), (2, 0.9, 0.5)]


def test_a_confidence_of_exactly_one_lands_in_the_last_bin() -> None:
    table = reliability_table(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 1]), 10)
    assert [(r["bin_low"], r["bin_high"]) for r in table] == [(0.4, 0.5), (0.9, 1.0)]


def test_a_fit_that_is_not_better_is_recorded_as_kept_not_as_fitted(monkeypatch) -> None:
    """The record says what happened: T = 1 kept because the fitted T was worse, never "fitted" with T = 1."""
    import scipy.optimize

    rng = np.random.default_rng(4)
    logits = rng.normal(size=(200, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in probs])  # calibrated by construction: T = 1 is about right

    class Worse:
        x = np.log(2.5)  # a fit that went astray: sharper data would need T < 1, this softens

    monkeypatch.setattr(scipy.optimize, "minimize_scalar", lambda *a, **k: Worse())
    assert fit_temperature(probs, y) == (1.0, "kept T = 1 (fit not better)")
