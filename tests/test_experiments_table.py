"""`python -m imgclf experiments`: the reviewer's table stays narrow, shows what was swept and what decides."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from helpers import run

from imgclf.results.exptable import experiments_table

ROOT = Path(__file__).resolve().parents[1]


def test_on_this_repository_the_table_has_every_model_and_fits_a_screen() -> None:
    if not (ROOT / ".git").exists():
        import pytest

        pytest.skip("not a git checkout: dvc exp show needs one")
    out = run([sys.executable, "-m", "imgclf", "experiments", "--md"], ROOT).stdout
    header = out.splitlines()[0].strip("|").split("|")
    columns = [c.strip() for c in header]
    models = [*__import__("yaml").safe_load((ROOT / "params.yaml").read_text())["backbones"], "ensemble"]
    assert columns[0] == "experiment"
    assert {f"{m} {k}" for m in models for k in ("val_accuracy", "accuracy")} <= set(columns)
    assert len(columns) <= 25, columns
    full = run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], ROOT).stdout.splitlines()[0].split(",")
    assert len(full) > 150  # what the table saves the reviewer from


def test_only_swept_params_and_the_chosen_metrics_are_kept() -> None:
    rows = pd.DataFrame(
        {
            "Experiment": ["", "lr-1e-3", "lr-3e-3"],
            "rev": ["workspace", "abc1234", "def5678"],
            "typ": ["baseline", "branch_commit", "branch_base"],
            "train.lr": ["0.0003", "0.001", "0.003"],
            "train.heads": ["4", "4", "4"],  # not swept: left out
            "data/split/images.csv": ["h1", "h2", "h3"],  # a dependency's hash: left out
            "metrics/backbones/vgg16.json:val_accuracy": ["0.91", "0.93", "0.925"],
            "metrics/backbones/vgg16.json:accuracy": ["0.88", "0.9", "0.89"],
            "metrics/backbones/vgg16.json:val_loss": ["0.3", "0.2", "0.25"],
            "metrics/ensemble.json:val_accuracy": ["0.92", "0.94", "0.93"],
            "metrics/ensemble.json:accuracy": ["0.9", "0.91", "0.9"],
            "found": ["601", "601", "601"],
        }
    )
    sections = {"train", "data", "features"}
    table = experiments_table(rows.to_csv(index=False), sections)
    assert list(table.columns) == [
        "experiment", "train.lr", "vgg16 val_accuracy", "ensemble val_accuracy", "vgg16 accuracy", "ensemble accuracy"
    ]  # fmt: skip
    assert table.experiment.tolist() == ["workspace", "lr-1e-3", "lr-3e-3"]
    assert table["vgg16 val_accuracy"].tolist() == ["0.9100", "0.9300", "0.9250"]
    wider = experiments_table(rows.to_csv(index=False), sections, ("val_accuracy", "accuracy", "val_loss"))
    assert "vgg16 val_loss" in wider.columns and "ensemble val_loss" not in wider.columns
