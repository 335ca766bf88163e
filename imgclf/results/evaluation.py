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
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from imgclf.core.io import read_csv, write_csv, write_json, write_text
from imgclf.results.calibration import calibration_report, reliability_table
from imgclf.results.significance import bootstrap_interval

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


def _groups(groups: list[str] | None) -> np.ndarray | None:
    return None if groups is None else np.asarray(groups, dtype=object)


def predictions_frame(
    paths: list[str], actual: list[str], probs: np.ndarray, classes: list[str], groups: list[str] | None = None
) -> pd.DataFrame:
    """path, actual, [group,] predicted, and one probability column per class."""
    frame = pd.DataFrame({"path": paths, "actual": actual})
    if groups is not None:
        frame["group"] = list(groups)
    frame["predicted"] = np.asarray(classes)[probs.argmax(axis=1)]
    return pd.concat([frame, pd.DataFrame(probs, columns=probability_columns(classes))], axis=1)


def compute_metrics(
    actual: list[str],
    probs: np.ndarray,
    classes: list[str],
    n_bootstrap: int,
    confidence: float,
    seed: int,
    groups: list[str] | None = None,
) -> dict[str, Any]:
    """Every number of one model on one split. The bootstrap resamples whole `groups` (identical files and
    near-copies share one) where they are given, single images otherwise."""
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
    present = np.unique(y_true)
    # Averages over the classes present in the test split, as the bootstrap's resamples do: a class with no
    # test image has no F1 (scikit-learn would count it as 0, and the point would fall outside its interval).
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=list(present), average=avg, zero_division=0
        )
        metrics[avg] = {"precision": _r(ap), "recall": _r(ar), "f1": _r(af)}
    if len(present) == len(classes):
        scores = normalised(probs, floor=0.0)  # no clipping: it would tie the smallest scores
        if len(classes) == 2:  # binary: scikit-learn wants the positive class's score (one-vs-rest is the same)
            auc = roc_auc_score(y_true, scores[:, 1])
        else:
            auc = roc_auc_score(y_true, scores, multi_class="ovr", labels=k)
        metrics["roc_auc_ovr_macro"] = _r(auc)
    else:  # AUC is undefined for a class absent from the test split
        metrics["roc_auc_ovr_macro"] = None
    ci = bootstrap_interval(y_true, y_pred, len(classes), n_bootstrap, confidence, seed, _groups(groups))
    metrics["ci"] = {
        "level": confidence,
        "resamples": n_bootstrap,
        "resampled": "groups" if groups is not None else "images",
        "groups": len(set(groups)) if groups is not None else len(y_true),
        **{name: [_r(x) for x in bounds] for name, bounds in ci.items()},
    }
    return metrics


def headline(metrics: dict[str, Any], validation: dict[str, float]) -> dict[str, Any]:
    """The numbers tracked as DVC metrics, eleven per model, so that `dvc exp show` and `dvc metrics diff` stay
    readable: validation accuracy and loss first (what a winner is chosen on), then the test numbers (what the
    chosen model is reported with): accuracy and macro F1 with their bootstrap interval, ROC AUC, log loss, and
    the expected calibration error of the probabilities it writes (after calibration). Everything else (per
    class, weighted, macro precision and recall, the interval's level, ECE and Brier before calibration) is in
    report.json."""
    ci = metrics["ci"]
    return {
        "val_accuracy": validation["accuracy"],
        "val_loss": validation["loss"],
        "accuracy": metrics["accuracy"],
        "accuracy_low": ci["accuracy"][0],
        "accuracy_high": ci["accuracy"][1],
        "macro_f1": metrics["macro"]["f1"],
        "macro_f1_low": ci["macro_f1"][0],
        "macro_f1_high": ci["macro_f1"][1],
        "roc_auc": metrics["roc_auc_ovr_macro"],
        "loss": metrics["loss"],
        "ece": metrics["calibration"]["ece_after"] if "calibration" in metrics else None,
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
    validation: dict[str, float],
    groups: list[str] | None = None,
    uncalibrated: np.ndarray | None = None,
    temperature: float = 1.0,
    bins: int = 15,
    before_label: str = "before",
) -> dict[str, Any]:
    """Write the headline metrics JSON (a DVC metric: `validation`'s accuracy and loss, then the test numbers),
    and in plot_dir report.json (every number), predictions.csv, classification_report.txt, confusion.png,
    reliability.csv (the calibrated test probabilities' reliability diagram, a DVC plot) and reliability.png
    (before and after) for one model. `probs` are the model's calibrated probabilities, `uncalibrated` the
    same before its `temperature` (None: no calibration, T = 1), `before_label` their name in the diagram.
    Returns every number."""
    from imgclf.results.plots import confusion_heatmap, reliability_diagram

    plot_dir = Path(plot_dir)
    metrics = compute_metrics(actual, probs, classes, n_bootstrap, confidence, seed, groups)
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[a] for a in actual], dtype=int)
    before = probs if uncalibrated is None else uncalibrated
    metrics["calibration"] = calibration_report(before, probs, y_true, temperature, bins)
    metrics["validation"] = validation
    write_json(metrics_path, headline(metrics, validation), sort_keys=False)
    write_json(plot_dir / "report.json", metrics)
    predictions = write_predictions(plot_dir / "predictions.csv", paths, actual, probs, classes, groups)
    report = classification_report(actual, predictions.predicted, labels=classes, digits=4, zero_division=0)
    write_text(plot_dir / "classification_report.txt", f"{name} on the test split ({len(actual)} images)\n\n{report}")
    matrix = confusion_matrix(actual, predictions.predicted, labels=classes)
    confusion_heatmap(matrix, classes, plot_dir / "confusion.png", title=name)
    after = reliability_table(probs, y_true, bins)
    write_csv(pd.DataFrame(after, columns=["bin_low", "bin_high", "images", "confidence", "accuracy"]),
              plot_dir / "reliability.csv")  # fmt: skip
    cal = metrics["calibration"]
    reliability_diagram(
        {before_label: reliability_table(before, y_true, bins), f"after (T = {temperature:g})": after},
        plot_dir / "reliability.png",
        title=f"{name}: reliability on the test split",
        ece={before_label: cal["ece_before"], f"after (T = {temperature:g})": cal["ece_after"]},
    )
    return metrics


def write_predictions(
    path: str | Path,
    paths: list[str],
    actual: list[str],
    probs: np.ndarray,
    classes: list[str],
    groups: list[str] | None = None,
) -> pd.DataFrame:
    """predictions.csv (path, actual, [group,] predicted, p_<class>...) with fixed-format probabilities. The
    group column (which images the split keeps together) lets `imgclf diff` resample groups at any revision."""
    predictions = predictions_frame(paths, actual, probs, classes, groups)
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
