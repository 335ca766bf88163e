"""Put the backbones side by side, and add their soft-voting ensemble as one more row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.evaluation import read_predictions


def ensemble_probabilities(prediction_files: list[Path]) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """Average the backbones' class probabilities (soft voting) over the same test images."""
    frames, classes, probs = [], None, []
    for path in prediction_files:
        frame, file_classes, p = read_predictions(path)
        if classes is not None and file_classes != classes:
            raise ValueError(f"{path} has classes {file_classes}, expected {classes}")
        if frames and not frame.path.equals(frames[0].path):
            raise ValueError(f"{path} lists other test images than {prediction_files[0]}")
        classes = file_classes
        frames.append(frame)
        probs.append(p)
    return frames[0][["path", "actual"]], classes or [], np.mean(probs, axis=0)


def summary_row(name: str, metrics: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    ci = metrics["ci"]
    return {
        "model": name,
        "accuracy": metrics["accuracy"],
        "accuracy_low": ci["accuracy"][0],
        "accuracy_high": ci["accuracy"][1],
        "macro_f1": metrics["macro"]["f1"],
        "macro_f1_low": ci["macro_f1"][0],
        "macro_f1_high": ci["macro_f1"][1],
        "roc_auc": metrics["roc_auc_ovr_macro"],
        "loss": metrics["loss"],
        **extra,
    }


def _fmt_seconds(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.1f}"


def markdown_table(summary: pd.DataFrame, level: float) -> str:
    """The comparison as a markdown table, best accuracy first (ensemble included)."""
    pct = f"{level:.0%}"
    lines = [
        f"| model | accuracy [{pct} CI] | macro F1 [{pct} CI] | ROC AUC (OvR macro) | parameters (trainable) "
        "| features s | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary.sort_values("accuracy", ascending=False, kind="stable").itertuples():
        auc = "n/a" if row.roc_auc is None or pd.isna(row.roc_auc) else f"{row.roc_auc:.4f}"
        params = "" if pd.isna(row.params_total) else f"{int(row.params_total):,} ({int(row.params_trainable):,})"
        lines.append(
            f"| {row.model} | {row.accuracy:.4f} [{row.accuracy_low:.4f}, {row.accuracy_high:.4f}] "
            f"| {row.macro_f1:.4f} [{row.macro_f1_low:.4f}, {row.macro_f1_high:.4f}] | {auc} | {params} "
            f"| {_fmt_seconds(row.features_seconds)} | {_fmt_seconds(row.train_seconds)} |"
        )
    return "\n".join(lines) + "\n"
