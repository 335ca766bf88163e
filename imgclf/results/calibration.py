"""Calibrated probabilities: temperature scaling, and the numbers that say whether it helped.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides a model's logits
by one number T, fitted on held-out predictions by minimising the log loss: T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one, and the predicted class never changes (dividing every logit of a row by the
same positive number keeps their order). The head ends in a softmax, so the logits are taken as log(p): softmax is
invariant to the constant that log(p) differs from the logits by.

Expected calibration error (ECE) here: the top-label confidence (the largest probability of a row) in
`bins` equal-width bins over [0, 1]; ECE = sum over bins of (images in the bin / all images) x |accuracy in the
bin - mean confidence in the bin|. The Brier score is the multi-class one: the mean over images of the sum over
classes of (p_k - [k is the true class])^2, between 0 (perfect) and 2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Bounds of the fitted temperature: wide enough for the heads seen here (0.49-1.23 on the sample). A fit that
# runs to a bound is not used (fit_temperature): with no validation error the log loss falls as T -> 0, and an
# underflowed probability (clipped at LOG_FLOOR) would be inflated by a large T.
T_MIN, T_MAX = 0.1, 10.0
LOG_FLOOR = 1e-30  # probabilities are clipped here before the log (float32 softmax can underflow to 0)
DIGITS = 6  # the recorded temperature, rounded: the value every later step applies is the recorded one


def logits_of(probs: np.ndarray) -> np.ndarray:
    """log(p) in float64, p clipped at LOG_FLOOR: logits up to a per-row constant."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), LOG_FLOOR, None))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), float64. T = 1 returns the probabilities as they are (no round trip through log)."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs
    z = logits_of(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean log loss of the temperature-scaled probabilities, computed from logits (stable for any T)."""
    z = logits_of(probs) / temperature
    z_max = z.max(axis=1, keepdims=True)
    log_norm = z_max[:, 0] + np.log(np.exp(z - z_max).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """(T, status): the T in [T_MIN, T_MAX] that minimises the log loss of `probs` (N, K) against integer labels
    `y`, rounded to DIGITS decimals, and "fitted"; or (1.0, why not) when the split cannot tell a temperature:
    no rows, probabilities that are not finite, no misclassified row (the loss then keeps falling as T -> 0:
    any sharpening "helps"), or a fit that ran to a bound; (1.0, "kept T = 1 (fit not better)") when the fitted T,
    once rounded, does not lower the log loss. Deterministic: a bounded scalar search (Brent's
    method) over log T, which the log loss is smooth in, from a fixed bracket; no random start."""
    from scipy.optimize import minimize_scalar

    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=int)
    if len(y) == 0:
        return 1.0, "not fitted: no validation images"
    if not np.isfinite(probs).all():
        return 1.0, "not fitted: the validation probabilities are not all finite"
    if (probs.argmax(axis=1) == y).all():
        return 1.0, "not fitted: no validation image is misclassified, so any sharpening lowers the log loss"
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(probs, y, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-7},
    )
    fitted = round(math.exp(float(result.x)), DIGITS)
    if fitted <= T_MIN * 1.01 or fitted >= T_MAX / 1.01:
        return 1.0, f"not fitted: the fit ran to its bound ({fitted:g}, bounds {T_MIN:g}-{T_MAX:g})"
    # The search stops within xatol of the optimum; never return a T worse than doing nothing.
    if negative_log_likelihood(probs, y, fitted) > negative_log_likelihood(probs, y, 1.0):
        return 1.0, "kept T = 1 (fit not better)"
    return fitted, "fitted"


def top_label(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) per row: the largest probability, and whether its class is the true one."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(y)).astype(np.float64)


def bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1], right edge included in the last bin: bin i holds (i/bins, (i+1)/bins]."""
    return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)


def reliability_table(probs: np.ndarray, y: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """One row per non-empty bin: its edges, images, mean confidence and accuracy (a reliability diagram's
    points)."""
    confidence, correct = top_label(probs, y)
    index = bin_index(confidence, bins)
    rows = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            rows.append(
                {
                    "bin_low": round(b / bins, 6),
                    "bin_high": round((b + 1) / bins, 6),
                    "images": int(inside.sum()),
                    "confidence": round(float(confidence[inside].mean()), 6),
                    "accuracy": round(float(correct[inside].mean()), 6),
                }
            )
    return rows


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int) -> float:
    """ECE over `bins` equal-width bins of the top-label confidence (see the module's docstring)."""
    confidence, correct = top_label(probs, y)
    if len(confidence) == 0:
        return float("nan")
    index = bin_index(confidence, bins)
    total = 0.0
    for b in np.unique(index):
        inside = index == b
        total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / len(confidence))


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - onehot_k)^2; 0 is perfect, 2 the worst."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(probs)), np.asarray(y, dtype=int)] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def calibration_report(
    uncalibrated: np.ndarray, calibrated: np.ndarray, y: np.ndarray, temperature: float, bins: int
) -> dict[str, Any]:
    """ECE and Brier before and after calibration on one split, with the binning that ECE used."""

    def r(x: float) -> float:
        return round(float(x), DIGITS)

    return {
        "temperature": temperature,
        "ece_bins": f"{bins} equal-width bins of the top-label confidence",
        "ece_before": r(expected_calibration_error(uncalibrated, y, bins)),
        "ece_after": r(expected_calibration_error(calibrated, y, bins)),
        "brier_before": r(brier_score(uncalibrated, y)),
        "brier_after": r(brier_score(calibrated, y)),
    }
