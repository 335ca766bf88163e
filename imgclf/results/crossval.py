"""Cross-validation on cached features (cv@<bb>), and the images whose labels the models disagree with.

    train + validation rows (test untouched) -> stratified group k-fold (groups: split's `group` column,
    identical and near-duplicate content) -> per fold: an inner validation part of the training
    folds for early stopping, oversampling of the rest only, the head of train@ fitted on the cached features
    -> the held-out fold's probabilities (out-of-fold) and its accuracy, macro F1 and log loss

Nothing here imports TensorFlow: fold assignment, summaries and the label-issue ranking are plain NumPy and
scikit-learn, so `cv.folds: 0` writes its empty outputs without starting it (stages/cv.py imports the head
only when there is something to train).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from imgclf.core.errors import UserError
from imgclf.data.split import balance_train, group_key
from imgclf.results.evaluation import normalised, probability_columns

OOF_COLUMNS = ["repeat", "fold", "path", "label", "group"]
FOLD_COLUMNS = ["repeat", "fold", "images", "train_rows", "inner_val_images", "epochs_run", "best_epoch",
                "accuracy", "macro_f1", "loss"]  # fmt: skip
ISSUE_COLUMNS = ["rank", "path", "given", "suggested", "score", "backbones"]
METRICS = ("accuracy", "macro_f1", "loss")


def pool(train: pd.DataFrame, val: pd.DataFrame) -> pd.DataFrame:
    """What cross-validation draws its folds from: the training and validation splits (unbalanced), one row per
    file, sorted by path, with the key that must stay in one fold (`group`)."""
    both = pd.concat([train, val], ignore_index=True).sort_values("path").reset_index(drop=True)
    return both.assign(group=group_key(both).to_numpy())


def assign_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every row: stratified by label, each group wholly in one fold, seeded.

    scikit-learn's StratifiedGroupKFold (shuffle=True) places groups so that each fold's class shares stay
    close to the whole's. Stops with one line when there are fewer groups than folds; a class with fewer
    groups than folds is allowed (some folds then test none of it) and `class_fold_shortfall` names it."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    if n_groups < folds:
        raise UserError(
            f"cv.folds={folds} needs at least {folds} groups of images in train + validation; there are {n_groups} "
            "(identical and near-duplicate images count as one); lower cv.folds"
        )
    out = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # stages/cv.py names such classes itself (class_fold_shortfall)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            out[held] = k
    return out


def class_fold_shortfall(labels: np.ndarray, groups: np.ndarray, folds: int) -> dict[str, int]:
    """Classes with fewer groups than folds: {label: groups}."""
    per_class = pd.Series(groups).groupby(pd.Series(labels)).nunique()
    return {str(k): int(v) for k, v in per_class.items() if v < folds}


def inner_validation(labels: np.ndarray, groups: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A mask of the training folds' rows kept for early stopping: the first of round(1/share) group-stratified
    parts (StratifiedGroupKFold), so it holds whole groups of every class; its share is 1/round(1/share) (0.2: a
    fifth; 0.3: a third), the nearest share of that form."""
    from sklearn.model_selection import StratifiedGroupKFold

    parts = max(2, min(round(1 / share), len(set(groups))))
    splitter = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer groups than parts: it is simply absent from some
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def fold_plan(data: pd.DataFrame, folds: np.ndarray, k: int, inner_share: float, method: str, seed: int) -> dict:
    """For fold k: the held-out rows, the inner validation rows and the (oversampled) training rows, as
    frames. Oversampling sees the training part of the training folds only: never a held-out or inner
    validation row. Every class outside the held-out fold keeps at least one group in the training part."""
    held = folds == k
    rest = data[~held].reset_index(drop=True)
    if rest.group.nunique() < 2:
        raise UserError(
            f"cross-validation fold {k + 1} leaves {rest.group.nunique()} group(s) of images to train and stop early "
            "on (two or more needed); lower cv.folds or add images"
        )
    inner = inner_validation(rest.label.to_numpy(), rest.group.to_numpy(), inner_share, seed + k)
    # A class whose groups outside the held-out fold all fell into the inner part goes back to training: a head
    # that never saw a class would give its held-out images ~0 for their own label (false label issues).
    lost = set(rest.label) - set(rest.label[~inner])
    inner &= ~rest.label.isin(lost).to_numpy()
    if rest.label[~inner].nunique() < 2:
        raise UserError(
            f"cross-validation fold {k + 1} leaves one class ({rest.label[~inner].iloc[0]!r}) to train on; lower "
            "cv.folds or add images of the other classes"
        )
    return {
        "held": data[held].reset_index(drop=True),
        "inner_val": rest[inner].reset_index(drop=True),
        "train": balance_train(rest[~inner].reset_index(drop=True), method, seed + k),
    }


def fold_metrics(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, macro F1 (over the classes present in the fold's truth, as the test report's) and log loss."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    predicted = probs.argmax(axis=1)
    return {
        "accuracy": round(float(accuracy_score(y_true, predicted)), 6),
        "macro_f1": round(
            float(f1_score(y_true, predicted, labels=np.unique(y_true), average="macro", zero_division=0)), 6
        ),
        "loss": round(float(log_loss(y_true, normalised(probs), labels=list(range(n_classes)))), 6),
    }


def summarise(values: list[float], confidence: float, test_train_ratio: float) -> dict[str, float]:
    """Mean, sample standard deviation and a t-interval for the mean across the folds of all repeats.

    The folds share training images, so their scores are not independent and the plain t-interval,
    sd / sqrt(k r), is far too narrow (and shrinks with every repeat, with no new data). The interval uses
    Nadeau and Bengio's corrected variance (Machine Learning 52, 2003; for repeated k-fold, Bouckaert and
    Frank, PAKDD 2004): sd^2 (1 / (k r) + n_test / n_train), with k r - 1 degrees of freedom. Still a
    heuristic (no unbiased estimator of this variance exists; Bengio and Grandvalet, JMLR 2004)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    se = sd * math.sqrt(1 / len(x) + test_train_ratio)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * se) if len(x) > 1 else 0.0
    return {k: round(v, 6) for k, v in {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}.items()}


def test_train_ratio(folds: pd.DataFrame) -> float:
    """The n_test / n_train of Nadeau and Bengio's correction, from the folds' own counts: each fold's held-out
    images over the images its head trained on (the other folds less the inner validation part, before
    oversampling), averaged. Not 1 / (k - 1): the inner validation part is not trained on (at cv.inner_val 0.2
    and k = 5 the ratio is 0.3125, not 0.25)."""
    total = folds.groupby("repeat")["images"].transform("sum")  # each image is held out once per repeat
    trained_on = total - folds["images"] - folds["inner_val_images"]
    return float((folds["images"] / trained_on).mean())


def summary(folds: pd.DataFrame, confidence: float) -> dict[str, Any]:
    """metrics/cv/<bb>.json: the fold count, repeats, and mean/sd/interval of each metric, with the correction's
    test/train ratio from the folds' own counts (test_train_ratio)."""
    k = int(folds.fold.nunique())
    out: dict[str, Any] = {"folds": k, "repeats": int(folds.repeat.nunique())}
    ratio = test_train_ratio(folds)
    for metric in METRICS:
        out[metric] = summarise(folds[metric].tolist(), confidence, test_train_ratio=ratio)
    out["ci_level"] = confidence
    out["ci"] = "t, Nadeau-Bengio corrected variance"
    return out


def empty_outputs(classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What cv@ writes with `cv.folds: 0`: the two tables with their columns and no rows."""
    return (
        pd.DataFrame(columns=[*OOF_COLUMNS, *probability_columns(classes)]),
        pd.DataFrame(columns=FOLD_COLUMNS),
    )


def combined_probabilities(oof_tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """One probability row per image: the mean over backbones and repeats of its out-of-fold probabilities
    (soft voting, as the ensemble). Returns (path, label) rows sorted by path, the classes and (N, K)."""
    frames = [t for t in oof_tables.values() if len(t)]
    if not frames:
        return pd.DataFrame(columns=["path", "label"]), [], np.zeros((0, 0))
    columns = [c for c in frames[0].columns if c.startswith("p_")]
    for name, table in oof_tables.items():
        if [c for c in table.columns if c.startswith("p_")] != columns:
            raise UserError(f"the out-of-fold table of {name} has other classes than the first; rerun cv@")
    both = pd.concat(frames, ignore_index=True)
    both[columns] = both[columns].astype(np.float64)
    mean = both.groupby(["path", "label"], sort=True)[columns].mean().reset_index()
    return mean[["path", "label"]], [c[2:] for c in columns], mean[columns].to_numpy()


def rank_label_issues(labels: list[str], classes: list[str], probs: np.ndarray) -> pd.DataFrame:
    """The rows whose given label the out-of-fold probabilities disagree with, most suspicious first.

    Which rows: cleanlab's confident learning (`find_label_issues`, prune by noise rate: the confident joint
    of given and predicted labels estimates how many of each class are mislabelled, and that many of the
    least likely rows are flagged). Their order and score: the self-confidence, the probability of the given
    label (lower is more suspicious). The suggested label is the most probable one."""
    from cleanlab.filter import find_label_issues

    if len(labels) == 0:
        return pd.DataFrame(columns=["row", "given", "suggested", "score"])
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in labels])
    p = normalised(probs)
    ranked = find_label_issues(y, p, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence")
    ranked = np.asarray(ranked, dtype=np.int64)
    return pd.DataFrame(
        {
            "row": ranked,
            "given": [labels[i] for i in ranked],
            "suggested": [classes[j] for j in p[ranked].argmax(axis=1)],
            "score": np.round(p[ranked, y[ranked]], 6),
        }
    )
