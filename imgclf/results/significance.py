"""Is a difference more than chance? Paired tests on the same test images, resampling whole groups.

Two models evaluated on the same test split are compared image by image (paired): only the images on which
they disagree about correctness carry information. The unit of independence is the group (identical files and
near-copies, kept in one split by `split`), not the file: a bootstrap that resampled single images would
treat five copies of one picture as five pieces of evidence and give intervals that are too narrow.

- `mcnemar_exact`: exact (binomial) McNemar test on the discordant pairs, images as the unit.
- `grouped_sign_flip`: the same question with the group as the unit: an exact sign-flip permutation test of
  the per-group differences (B-only minus A-only right images); it is exact McNemar when every group has one
  image. The verdicts of `imgclf verify` and `imgclf diff` use it, so that they count what the intervals
  resample: a patient's ten slices are one piece of evidence, not ten.
- `bootstrap_interval`: percentile intervals of one model's accuracy and macro F1, resampling groups.
- `paired_bootstrap`: percentile intervals of the change B - A in accuracy and macro F1, resampling the same
  groups for both models.
Macro F1 in a resample averages over the classes present in that resample's true labels: a class that a
resample happens to leave out has no F1 (scikit-learn would count it as 0 and drag a perfect model to 0.75).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """(a_only, b_only, p): images only A got right, images only B got right, and the two-sided exact McNemar
    p-value, 2 * P(X <= min) for X ~ Binomial(a_only + b_only, 1/2), capped at 1 (1 when none are discordant)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(a_only, b_only), n, 0.5)))
    return a_only, b_only, p


def grouped_sign_flip(correct_a: np.ndarray, correct_b: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Two-sided p-value of an exact sign-flip permutation test over groups (Fisher's randomisation test for
    paired data, clustered; Obuchowski 1998 and Durkalski et al. 2003 give the large-sample version). Each
    group's d = (images only B got right) - (images only A got right); under the null that A and B are
    exchangeable within every group, each d's sign is + or - with probability 1/2 independently, and
    p = P(|sum of +-d| >= |sum of d|). The distribution is computed exactly: groups with the same |d| add
    |d| x (2 Binomial(m, 1/2) - m), convolved across the distinct |d|. Without groups (or one image a group)
    this is exactly `mcnemar_exact`'s p."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    diff = b.astype(np.int64) - a.astype(np.int64)
    if groups is None:
        d = diff
    else:
        _, codes = np.unique(np.asarray(groups), return_inverse=True)
        d = np.bincount(codes, weights=diff).astype(np.int64)
    d = np.abs(d[d != 0])
    observed = abs(int((b.astype(np.int64) - a.astype(np.int64)).sum()))
    if observed == 0 or len(d) == 0:
        return 1.0
    pmf = np.ones(1)  # the distribution of the sum, offset by `low`
    low = 0
    for value, m in zip(*np.unique(d, return_counts=True), strict=True):
        part = np.zeros(int(value) * int(m) * 2 + 1)  # m groups of |d| = value: sums -value*m .. value*m
        part[:: 2 * int(value)] = binom.pmf(np.arange(m + 1), m, 0.5)
        pmf, low = np.convolve(pmf, part), low - int(value) * int(m)
    sums = np.arange(len(pmf)) + low
    return float(min(1.0, pmf[np.abs(sums) >= observed].sum()))


def macro_f1_present(confusion: np.ndarray) -> float:
    """Macro F1 from a (K, K) confusion matrix (rows true, columns predicted; counts may be weights), averaged
    over the classes with at least one true image. F1 of a class with no true positives is 0."""
    c = np.asarray(confusion, dtype=np.float64)
    return float(_f1_from_counts(np.diag(c)[None], c.sum(axis=1)[None], c.sum(axis=0)[None])[0])


CHUNK = 250  # resamples weighted at once: memory is CHUNK x images, whatever the number of resamples


def _f1_from_counts(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Macro F1 per row from (R, K) weighted counts, over the classes with support in that row."""
    denominator = support + predicted  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    present = support > 0
    return np.where(present, f1, 0.0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)


class _Resampled:
    """Accuracy and macro F1 of predictions under many image weightings, from (N, K) indicator matrices:
    memory grows with images x classes, never with images x classes^2."""

    def __init__(self, y_true: np.ndarray, y_pred: np.ndarray, k: int) -> None:
        eye = np.eye(k)
        self.true, self.pred = eye[y_true], eye[y_pred]  # (N, K) each
        self.right = y_true == y_pred  # (N,)
        self.hits = self.true * self.right[:, None]  # (N, K): true positives by class

    def __call__(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy (R,), macro F1 (R,)) for weights (R, N)."""
        accuracy = weights @ self.right / weights.sum(axis=1)
        f1 = _f1_from_counts(weights @ self.hits, weights @ self.true, weights @ self.pred)
        return accuracy, f1


def weight_chunks(groups: np.ndarray | None, n_images: int, resamples: int, seed: int):
    """Yield (r, n_images) arrays, `resamples` rows in all: how often each image is drawn when whole groups are
    drawn with replacement (as many draws as there are groups). Without groups every image is its own group."""
    if resamples < 1:
        raise ValueError(f"resamples must be 1 or more. Received: {resamples}")
    rng = np.random.default_rng(seed)
    if groups is None:
        codes, n_groups = np.arange(n_images), n_images
    else:
        _, codes = np.unique(np.asarray(groups), return_inverse=True)
        n_groups = int(codes.max()) + 1 if n_images else 0
    for start in range(0, resamples, CHUNK):
        draws = rng.integers(0, n_groups, (min(CHUNK, resamples - start), n_groups))
        counts = np.stack([np.bincount(row, minlength=n_groups) for row in draws]).astype(np.float64)
        yield counts[:, codes]


def group_weights(groups: np.ndarray | None, n_images: int, resamples: int, seed: int) -> np.ndarray:
    """All of weight_chunks' rows as one (resamples, n_images) array (for small cases and tests)."""
    return np.concatenate(list(weight_chunks(groups, n_images, resamples, seed)))


def _percentiles(values: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    resamples: int,
    confidence: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and macro F1 (classes present), resampling whole groups."""
    measure = _Resampled(np.asarray(y_true), np.asarray(y_pred), n_classes)
    parts = [measure(w) for w in weight_chunks(groups, len(y_true), resamples, seed)]
    accuracy, f1 = (np.concatenate(x) for x in zip(*parts, strict=True))
    return {"accuracy": _percentiles(accuracy, confidence), "macro_f1": _percentiles(f1, confidence)}


@dataclass(frozen=True)
class PairedComparison:
    """B against A on the same images: point values, changes with their paired bootstrap interval, and the grouped
    test's p-value (with McNemar's on images beside it, for comparison)."""

    images: int
    groups: int
    accuracy: tuple[float, float]  # (A, B)
    macro_f1: tuple[float, float]
    accuracy_change: float  # B - A
    accuracy_change_interval: tuple[float, float]
    macro_f1_change: float
    macro_f1_change_interval: tuple[float, float]
    right_to_wrong: int  # A right, B wrong
    wrong_to_right: int  # A wrong, B right
    p_value: float  # exact sign-flip test over groups, two-sided (exact McNemar when groups are single images)
    p_value_images: float  # exact McNemar over images: what the p-value would be if images were independent
    agreement: float  # share of images with the same predicted class


def paired_bootstrap(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_classes: int,
    resamples: int,
    confidence: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> PairedComparison:
    """Compare B with A on the same test images: each resample draws the same groups for both models."""
    y_true, pred_a, pred_b = (np.asarray(x) for x in (y_true, pred_a, pred_b))
    right_a, right_b = pred_a == y_true, pred_b == y_true
    measure_a, measure_b = _Resampled(y_true, pred_a, n_classes), _Resampled(y_true, pred_b, n_classes)
    accuracy_change, f1_change = [], []
    for weights in weight_chunks(groups, len(y_true), resamples, seed):  # the same groups for both models
        (acc_a, f1_a), (acc_b, f1_b) = measure_a(weights), measure_b(weights)
        accuracy_change.append(acc_b - acc_a)
        f1_change.append(f1_b - f1_a)
    once = np.ones((1, len(y_true)))
    f1_a, f1_b = float(measure_a(once)[1][0]), float(measure_b(once)[1][0])
    right_to_wrong, wrong_to_right, p_images = mcnemar_exact(right_a, right_b)
    acc_a, acc_b = float(right_a.mean()), float(right_b.mean())
    return PairedComparison(
        images=len(y_true),
        groups=len(np.unique(groups)) if groups is not None else len(y_true),
        accuracy=(acc_a, acc_b),
        macro_f1=(f1_a, f1_b),
        accuracy_change=acc_b - acc_a,
        accuracy_change_interval=tuple(_percentiles(np.concatenate(accuracy_change), confidence)),  # type: ignore[arg-type]
        macro_f1_change=f1_b - f1_a,
        macro_f1_change_interval=tuple(_percentiles(np.concatenate(f1_change), confidence)),  # type: ignore[arg-type]
        right_to_wrong=right_to_wrong,
        wrong_to_right=wrong_to_right,
        p_value=grouped_sign_flip(right_a, right_b, groups),
        p_value_images=p_images,
        agreement=float(np.mean(pred_a == pred_b)),
    )
