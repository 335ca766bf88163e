"""Paired statistics on constructed predictions: McNemar against SciPy and a hand computation, the paired
bootstrap, intervals that resample groups (not copies), and macro F1 over the classes a resample holds."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from imgclf.results.evaluation import compute_metrics
from imgclf.results.significance import (
    bootstrap_interval,
    group_weights,
    grouped_sign_flip,
    macro_f1_present,
    mcnemar_exact,
    paired_bootstrap,
)


@pytest.mark.parametrize(("a_only", "b_only"), [(0, 0), (1, 0), (7, 1), (3, 3), (12, 2), (0, 9)])
def test_mcnemar_matches_scipy_binomial_test(a_only: int, b_only: int) -> None:
    both, neither = 50, 10
    correct_a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=bool)
    correct_b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=bool)
    got = mcnemar_exact(correct_a, correct_b)
    expected = 1.0 if a_only + b_only == 0 else binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert got[:2] == (a_only, b_only)
    assert got[2] == pytest.approx(expected, rel=1e-12)


def test_mcnemar_by_hand() -> None:
    """7 images only A got right, 1 only B: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 18/256."""
    correct_a = np.array([1] * 7 + [0] + [1] * 20, dtype=bool)
    correct_b = np.array([0] * 7 + [1] + [1] * 20, dtype=bool)
    assert mcnemar_exact(correct_a, correct_b)[2] == pytest.approx(2 * (comb(8, 0) + comb(8, 1)) / 2**8)


def test_macro_f1_counts_only_classes_present() -> None:
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (y_true, y_pred), 1)  # class 3: never true, never predicted
    expected = f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert macro_f1_present(confusion) == pytest.approx(expected)


def test_a_perfect_classifier_gets_a_perfect_macro_f1_interval_with_a_one_image_class() -> None:
    """30/30/30/1 test images, all right: resamples that leave the single image out have three classes, each
    with F1 = 1. Counting the absent class as F1 = 0 gave [0.75, 1.0]."""
    actual = ["a"] * 30 + ["b"] * 30 + ["c"] * 30 + ["d"]
    classes = ["a", "b", "c", "d"]
    probs = np.eye(4)[[classes.index(x) for x in actual]]
    metrics = compute_metrics(actual, probs, classes, n_bootstrap=500, confidence=0.95, seed=0)
    assert metrics["ci"]["macro_f1"] == [1.0, 1.0]
    assert metrics["ci"]["accuracy"] == [1.0, 1.0]


def test_group_resampling_keeps_copies_together_and_widens_the_interval() -> None:
    """Ten groups of ten identical images, five groups all right, five all wrong. Resampling groups, every
    resample's accuracy is a multiple of 1/10; resampling images treats 100 copies as 100 pieces of evidence
    and gives an interval about three times too narrow."""
    groups = np.repeat(np.arange(10), 10).astype(str)
    y_true = np.zeros(100, dtype=int)
    y_pred = np.where(np.repeat(np.arange(10), 10) < 5, 0, 1)
    weights = group_weights(groups, 100, 200, seed=0)
    assert np.all(weights.reshape(200, 10, 10) == weights.reshape(200, 10, 10)[:, :, :1])  # a group moves whole
    assert np.allclose(weights.sum(axis=1), 100)
    grouped = bootstrap_interval(y_true, y_pred, 2, 1000, 0.95, seed=0, groups=groups)
    single = bootstrap_interval(y_true, y_pred, 2, 1000, 0.95, seed=0)
    for bound in grouped["accuracy"]:
        assert bound * 10 == pytest.approx(round(bound * 10))
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]  # noqa: E731
    assert width(grouped) > 2 * width(single)


def test_paired_bootstrap_of_identical_predictions_is_zero_and_of_a_crippled_model_excludes_zero() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    good = np.where(rng.random(200) < 0.9, y, (y + 1) % 3)
    same = paired_bootstrap(y, good, good.copy(), 3, 500, 0.95, seed=0)
    assert same.accuracy_change_interval == (0.0, 0.0) and same.p_value == 1.0 and same.agreement == 1.0
    crippled = np.where(rng.random(200) < 0.4, y, (y + 1) % 3)
    worse = paired_bootstrap(y, good, crippled, 3, 500, 0.95, seed=0)
    assert worse.accuracy_change_interval[1] < 0 and worse.macro_f1_change_interval[1] < 0
    assert worse.p_value < 1e-6
    assert worse.right_to_wrong == int(np.sum((good == y) & (crippled != y)))
    assert worse.accuracy_change == pytest.approx(np.mean(crippled == y) - np.mean(good == y))


def test_macro_f1_and_its_interval_agree_when_a_class_has_no_test_image() -> None:
    """Three classes of 30 test images, all right, and a fourth class with none: the point macro F1 and its
    interval average over the same (present) classes, so the point lies inside (it was 0.75 outside [1, 1])."""
    actual = ["a"] * 30 + ["b"] * 30 + ["c"] * 30
    classes = ["a", "b", "c", "d"]
    probs = np.eye(4)[[classes.index(x) for x in actual]]
    metrics = compute_metrics(actual, probs, classes, n_bootstrap=200, confidence=0.95, seed=0)
    low, high = metrics["ci"]["macro_f1"]
    assert metrics["macro"]["f1"] == 1.0 and low <= 1.0 <= high


def test_resampling_memory_grows_with_images_times_classes_not_classes_squared() -> None:
    """2,000 test images of 200 classes, 1,000 resamples: an (N, K^2) one-hot would take 640 MB; (N, K)
    indicators and 250 resamples at a time stay within a few tens of MB."""
    import tracemalloc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 200, 2000)
    pred = np.where(rng.random(2000) < 0.7, y, rng.integers(0, 200, 2000))
    tracemalloc.start()
    interval = bootstrap_interval(y, pred, 200, 1000, 0.95, seed=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 60e6, f"{peak / 1e6:.0f} MB"
    assert interval["accuracy"][0] < np.mean(y == pred) < interval["accuracy"][1]


def brute_force_sign_flip(correct_a: np.ndarray, correct_b: np.ndarray, groups: np.ndarray) -> float:
    """Every one of the 2^G sign patterns over the groups, enumerated."""
    from itertools import product

    diff = correct_b.astype(int) - correct_a.astype(int)
    d = np.array([diff[groups == g].sum() for g in np.unique(groups)])
    observed = abs(d.sum())
    hits = sum(abs(np.dot(signs, d)) >= observed for signs in product((-1, 1), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("seed", range(8))
def test_grouped_sign_flip_equals_the_brute_force_permutation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 60))
    groups = rng.integers(0, int(rng.integers(3, 13)), n)  # 3-12 groups of unequal sizes
    correct_a = rng.random(n) < 0.7
    correct_b = np.where(rng.random(n) < 0.3, ~correct_a, correct_a)
    assert grouped_sign_flip(correct_a, correct_b, groups) == pytest.approx(
        brute_force_sign_flip(correct_a, correct_b, groups), abs=1e-12
    )


@pytest.mark.parametrize(("a_only", "b_only"), [(0, 0), (1, 0), (7, 1), (3, 3), (12, 2), (0, 9)])
def test_grouped_sign_flip_is_exact_mcnemar_when_every_group_is_one_image(a_only: int, b_only: int) -> None:
    correct_a = np.array([1] * a_only + [0] * b_only + [1] * 40 + [0] * 9, dtype=bool)
    correct_b = np.array([0] * a_only + [1] * b_only + [1] * 40 + [0] * 9, dtype=bool)
    expected = mcnemar_exact(correct_a, correct_b)[2]
    assert grouped_sign_flip(correct_a, correct_b) == pytest.approx(expected, rel=1e-12)
    assert grouped_sign_flip(correct_a, correct_b, np.arange(len(correct_a))) == pytest.approx(expected, rel=1e-12)


def test_three_patients_worse_are_three_pieces_of_evidence_not_thirty() -> None:
    """20 patients x 10 test images; B gets 3 more patients wholly wrong. Images as the unit: McNemar p = 1.9e-9.
    Patients as the unit: 3 of 3 discordant patients one way, p = 2 / 2^3 = 0.25; and the paired bootstrap
    over patients agrees (its interval reaches 0)."""
    groups = np.repeat(np.arange(20), 10)
    correct_a = np.ones(200, dtype=bool)
    correct_b = correct_a.copy()
    correct_b[:30] = False  # patients 0, 1, 2
    assert mcnemar_exact(correct_a, correct_b)[2] == pytest.approx(1.86e-9, rel=0.01)
    assert grouped_sign_flip(correct_a, correct_b, groups) == pytest.approx(0.25)
    y = np.zeros(200, dtype=int)
    compared = paired_bootstrap(y, np.where(correct_a, 0, 1), np.where(correct_b, 0, 1), 2, 2000, 0.95, 0, groups)
    assert compared.p_value == pytest.approx(0.25) and compared.p_value_images < 1e-8
    assert compared.accuracy_change_interval[1] == pytest.approx(0.0)
