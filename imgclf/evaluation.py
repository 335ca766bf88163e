"""Honest numbers on the test split: point metrics, per-class metrics, ROC AUC, bootstrap intervals.

Backbones and the ensemble are evaluated by the same function (`evaluate_and_write`), from class
probabilities, so their rows in the comparison are computed exactly alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from imgclf.io import read_csv, write_csv, write_json, write_text

DIGITS = 6  # metrics are rounded so that diffs stay readable; far below any meaningful difference


def _r(x: float) -> float:
    return round(float(x), DIGITS)


def normalised(probs: np.ndarray, floor: float = 1e-7) -> np.ndarray:
    """Rows as float64 distributions: clipped at `floor` (log loss needs > 0) and renormalised to sum to one.
    Softmax in float32, or probabilities read back with 8 decimals, are off by ~1e-7 (scikit-learn warns)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), floor, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def probability_columns(classes: list[str]) -> list[str]:
    return [f"p_{c}" for c in classes]


def format_probability(value: float) -> str:
    """Probabilities in CSV files: fixed 8 decimals, the same in predictions.csv and predict's output."""
    return f"{value:.8f}"


def predictions_frame(paths: list[str], actual: list[str], probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """path, actual, predicted, and one probability column per class."""
    frame = pd.DataFrame({"path": paths, "actual": actual, "predicted": np.asarray(classes)[probs.argmax(axis=1)]})
    return pd.concat([frame, pd.DataFrame(probs, columns=probability_columns(classes))], axis=1)


def bootstrap_interval(
    y_true: np.ndarray, y_pred: np.ndarray, n: int, confidence: float, seed: int, n_classes: int
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (resampling test images with replacement) for accuracy and macro F1.

    Macro F1 averages over the same `n_classes` classes as the point estimate in every resample, so the
    interval is an interval of that very statistic."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_classes)
    acc, f1 = np.empty(n), np.empty(n)
    for i in range(n):
        idx = rng.integers(0, len(y_true), len(y_true))
        acc[i] = np.mean(y_true[idx] == y_pred[idx])
        f1[i] = f1_score(y_true[idx], y_pred[idx], labels=labels, average="macro", zero_division=0)
    tail = (1 - confidence) / 2 * 100
    return {
        "accuracy": [_r(np.percentile(acc, tail)), _r(np.percentile(acc, 100 - tail))],
        "macro_f1": [_r(np.percentile(f1, tail)), _r(np.percentile(f1, 100 - tail))],
    }


def compute_metrics(
    actual: list[str], probs: np.ndarray, classes: list[str], n_bootstrap: int, confidence: float, seed: int
) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[a] for a in actual])
    y_pred = probs.argmax(axis=1)
    k = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=k, zero_division=0)
    metrics: dict[str, Any] = {
        "test_images": len(y_true),
        "accuracy": _r(accuracy_score(y_true, y_pred)),
        "loss": _r(log_loss(y_true, normalised(probs), labels=k)),
        "per_class": {
            c: {"precision": _r(p[i]), "recall": _r(r[i]), "f1": _r(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
    }
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=k, average=avg, zero_division=0)
        metrics[avg] = {"precision": _r(ap), "recall": _r(ar), "f1": _r(af)}
    present = np.unique(y_true)
    if len(present) == len(classes):
        scores = normalised(probs, floor=0.0)  # no clipping: it would tie the smallest scores
        if len(classes) == 2:  # binary: scikit-learn wants the positive class's score (one-vs-rest is the same)
            auc = roc_auc_score(y_true, scores[:, 1])
        else:
            auc = roc_auc_score(y_true, scores, multi_class="ovr", labels=k)
        metrics["roc_auc_ovr_macro"] = _r(auc)
    else:  # AUC is undefined for a class absent from the test split
        metrics["roc_auc_ovr_macro"] = None
    ci = bootstrap_interval(y_true, y_pred, n_bootstrap, confidence, seed, len(classes))
    metrics["ci"] = {"level": confidence, "resamples": n_bootstrap, **ci}
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers tracked as DVC metrics, eight per model, so that `dvc exp show` and `dvc metrics diff` stay
    readable: accuracy and macro F1 with their bootstrap interval, ROC AUC, log loss. Everything else
    (per class, weighted, macro precision and recall, the interval's level) is in report.json beside it."""
    ci = metrics["ci"]
    return {
        "accuracy": metrics["accuracy"],
        "accuracy_low": ci["accuracy"][0],
        "accuracy_high": ci["accuracy"][1],
        "macro_f1": metrics["macro"]["f1"],
        "macro_f1_low": ci["macro_f1"][0],
        "macro_f1_high": ci["macro_f1"][1],
        "roc_auc": metrics["roc_auc_ovr_macro"],
        "loss": metrics["loss"],
    }


def evaluate_and_write(
    name: str,
    paths: list[str],
    actual: list[str],
    probs: np.ndarray,
    classes: list[str],
    metrics_path: str | Path,
    plot_dir: str | Path,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Write the headline metrics JSON (a DVC metric), and in plot_dir report.json (every number),
    predictions.csv, classification_report.txt and confusion.png for one model. Returns every number."""
    from imgclf.plots import confusion_heatmap

    plot_dir = Path(plot_dir)
    metrics = compute_metrics(actual, probs, classes, n_bootstrap, confidence, seed)
    write_json(metrics_path, headline(metrics))
    write_json(plot_dir / "report.json", metrics)
    predictions = write_predictions(plot_dir / "predictions.csv", paths, actual, probs, classes)
    report = classification_report(actual, predictions.predicted, labels=classes, digits=4, zero_division=0)
    write_text(plot_dir / "classification_report.txt", f"{name} on the test split ({len(actual)} images)\n\n{report}")
    matrix = confusion_matrix(actual, predictions.predicted, labels=classes)
    confusion_heatmap(matrix, classes, plot_dir / "confusion.png", title=name)
    return metrics


def write_predictions(
    path: str | Path, paths: list[str], actual: list[str], probs: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """predictions.csv (path, actual, predicted, p_<class>...) with fixed-format probabilities."""
    predictions = predictions_frame(paths, actual, probs, classes)
    with_format = predictions.copy()
    for col in probability_columns(classes):
        with_format[col] = with_format[col].map(format_probability)
    write_csv(with_format, path)
    return predictions


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """predictions.csv -> (frame, classes, probabilities (N, K)), labels as text."""
    frame = read_csv(path)
    columns = [c for c in frame.columns if c.startswith("p_")]
    return frame, [c[2:] for c in columns], frame[columns].to_numpy(dtype=np.float64)


def accuracy_and_loss(actual: list[str], probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy and log loss of class probabilities (used on the validation split to pick the best model)."""
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[a] for a in actual])
    return {
        "accuracy": _r(accuracy_score(y_true, probs.argmax(axis=1))),
        "loss": _r(log_loss(y_true, normalised(probs), labels=list(range(len(classes))))),
    }
