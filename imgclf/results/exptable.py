"""The experiments table a reviewer reads: `dvc exp show` narrowed to what decides and what reports.

`dvc exp show` lists every param, every dependency hash and every metric of every model: over 200 columns on the
bundled sample. `python -m imgclf experiments` keeps, per experiment: its name, the params that differ between the
experiments shown (what was swept), and per model its validation accuracy (choose on it) and test accuracy
(report it). On the sample that is 1 + 10 + the swept params. `--metric` adds other metrics (e.g. `val_loss`,
`macro_f1`, `ece`); `dvc exp show` itself stays there for everything else.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from imgclf.core.errors import UserError

HEADLINE = ("val_accuracy", "accuracy")  # choose on the first, report the second
MODEL_METRIC = re.compile(r"^metrics/(?:backbones/(?P<bb>[^/]+)|(?P<ens>ensemble))\.json:(?P<metric>\w+)$")


def experiments_table(show_csv: str, sections: set[str], metrics: tuple[str, ...] = HEADLINE) -> pd.DataFrame:
    """From `dvc exp show --csv`'s text: one row per experiment (workspace and commits included), with its name,
    the params that differ between the rows (columns under one of params.yaml's `sections`), and `<model>
    <metric>` for each model and metric asked for."""
    frame = pd.read_csv(io.StringIO(show_csv), dtype=str, keep_default_na=False)
    if frame.empty:
        raise UserError("dvc exp show lists no experiment; run `dvc repro` or `dvc exp run` first")
    if "Experiment" not in frame or "rev" not in frame:
        raise UserError("dvc exp show's table has no Experiment or rev column; do not --drop them")
    names = frame.Experiment.where(frame.Experiment != "", frame.rev)
    out = pd.DataFrame({"experiment": names})
    params = [c for c in frame.columns if "/" not in c and ":" not in c and c.split(".")[0] in sections]
    for column in params:
        values = frame[column]
        if values.nunique() > 1:
            out[column] = values
    for metric in metrics:
        for column in frame.columns:
            match = MODEL_METRIC.match(column)
            if match and match["metric"] == metric:
                out[f"{match['bb'] or match['ens']} {metric}"] = frame[column].map(_rounded)
    return out


def _rounded(text: str) -> str:
    """A metric as dvc prints it, cut to 4 decimals (the table is read, not computed on)."""
    try:
        return f"{float(text):.4f}"
    except ValueError:
        return text


def markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


def dvc_exp_show(root: Path, extra: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--csv", *extra], cwd=root, capture_output=True, text=True
    )
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines() or ["no output"]
        raise UserError(f"`dvc exp show` failed in {root}: {lines[-1]}")
    return done.stdout
