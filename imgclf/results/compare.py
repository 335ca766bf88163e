"""Put the backbones side by side, and add their soft-voting ensemble as one more row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.core.errors import UserError
from imgclf.results.evaluation import headline, read_predictions


def ensemble_probabilities(prediction_files: list[Path]) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """Average the backbones' class probabilities (soft voting) over the same images.

    Each file's probabilities are renormalised to sum to one first: they were written with 8 decimals, so a
    row can be off by ~1e-8, and the mean of such rows is not a distribution either."""
    frames, classes, probs = [], None, []
    for path in prediction_files:
        frame, file_classes, p = read_predictions(path)
        if classes is not None and file_classes != classes:
            raise UserError(
                f"{path} has classes {file_classes}, but {prediction_files[0]} has {classes}; "
                "the backbones were trained on different data: rerun `dvc repro` so that they are trained together"
            )
        if frames and not frame.path.equals(frames[0].path):
            raise UserError(f"{path} lists other images than {prediction_files[0]}; rerun `dvc repro`")
        classes = file_classes
        frames.append(frame)
        probs.append(p / p.sum(axis=1, keepdims=True))
    mean = np.mean(probs, axis=0)
    keep = [c for c in ("path", "actual", "group") if c in frames[0]]
    return frames[0][keep], classes or [], mean / mean.sum(axis=1, keepdims=True)


def summary_row(name: str, report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison: the model's name, the same headline numbers that evaluate tracks as metrics
    (validation first), and `extra` (parameter counts)."""
    return {"model": name, **headline(report, report["validation"]), **extra}


CV_COLUMNS = ["cv_accuracy", "cv_accuracy_sd", "cv_macro_f1", "cv_macro_f1_sd", "cv_folds"]


def cv_columns(cv: dict[str, Any]) -> dict[str, Any]:
    """A backbone's cross-validation summary (metrics/cv/<bb>.json) as comparison columns; empty values when
    cv.folds is 0."""
    if not cv.get("folds"):
        return dict.fromkeys(CV_COLUMNS)
    return {
        "cv_accuracy": cv["accuracy"]["mean"],
        "cv_accuracy_sd": cv["accuracy"]["sd"],
        "cv_macro_f1": cv["macro_f1"]["mean"],
        "cv_macro_f1_sd": cv["macro_f1"]["sd"],
        "cv_folds": f"{cv['folds']}x{cv['repeats']}",
    }


def pick_best(summary: pd.DataFrame) -> str:
    """The model with the highest validation accuracy (then the lowest validation loss): chosen without
    looking at the test split, whose numbers stay an unbiased estimate for the chosen model."""
    ranked = summary.sort_values(["val_accuracy", "val_loss", "model"], ascending=[False, True, True], kind="stable")
    return str(ranked.iloc[0].model)


def markdown_table(summary: pd.DataFrame, level: float) -> str:
    """The comparison as a markdown table, in the order of `summary` (ensemble included)."""
    pct = f"{level:.0%}"
    with_cv = "cv_accuracy" in summary and summary.cv_accuracy.notna().any()
    cv_header = " CV accuracy (mean ± sd, folds x repeats) | CV macro F1 (mean ± sd) |" if with_cv else ""
    lines = [
        f"| model | val accuracy | test accuracy [{pct} CI] | test macro F1 [{pct} CI] |{cv_header} ROC AUC (OvR "
        "macro) | ECE (calibrated) | parameters (trainable) |",
        "|---|---|---|---|" + ("---|---|" if with_cv else "") + "---|---|---|",
    ]
    for row in summary.itertuples():
        auc = "n/a" if row.roc_auc is None or pd.isna(row.roc_auc) else f"{row.roc_auc:.4f}"
        ece = "n/a" if "ece" not in summary or pd.isna(row.ece) else f"{row.ece:.4f}"
        params = "" if pd.isna(row.params_total) else f"{int(row.params_total):,} ({int(row.params_trainable):,})"
        cv = ""
        if with_cv:
            cv = (
                " n/a | n/a |"
                if pd.isna(row.cv_accuracy)
                else f" {row.cv_accuracy:.4f} ± {row.cv_accuracy_sd:.4f} ({row.cv_folds}) | {row.cv_macro_f1:.4f} ± "
                f"{row.cv_macro_f1_sd:.4f} |"
            )
        lines.append(
            f"| {row.model} | {row.val_accuracy:.4f} | {row.accuracy:.4f} [{row.accuracy_low:.4f}, "
            f"{row.accuracy_high:.4f}] | {row.macro_f1:.4f} [{row.macro_f1_low:.4f}, {row.macro_f1_high:.4f}] "
            f"|{cv} {auc} | {ece} | {params} |"
        )
    return "\n".join(lines) + "\n"
