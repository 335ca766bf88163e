"""compare: all backbones side by side, plus their soft-voting ensemble evaluated like a backbone.

    python -m stages.compare --plots-dir plots/backbones \
        --summary plots/compare/summary.json --ensemble-metrics metrics/ensemble.json --ensemble-dir plots/ensemble \
        --ensemble-record models/ensemble.json --out-dir plots/compare --cv-metrics metrics/cv

The backbones are those in params.yaml (a folder left over from a removed backbone is ignored). The best
model is picked on the validation split; the test split only reports how good the pick is. The ensemble averages
the backbones' calibrated probabilities; with train.calibration: temperature it gets its own temperature, fitted
on the validation split's average and recorded in models/ensemble.json (predict and export apply it).
"""

import argparse
from pathlib import Path

import pandas as pd

from imgclf.core.errors import UserError, log, stage_main
from imgclf.core.io import read_json, write_csv, write_json, write_text
from imgclf.params import load_params
from imgclf.results.calibration import apply_temperature, fit_temperature
from imgclf.results.compare import cv_columns, ensemble_probabilities, markdown_table, pick_best, summary_row
from imgclf.results.evaluation import accuracy_and_loss, evaluate_and_write, write_predictions
from imgclf.results.plots import comparison_plot


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in (
        "--plots-dir", "--summary", "--ensemble-metrics", "--ensemble-dir", "--ensemble-record",
        "--out-dir", "--cv-metrics",
    ):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    evaluate = params["evaluate"]
    backbones = params["backbones"]

    missing = [bb for bb in backbones if not (args.plots_dir / bb / "report.json").is_file()]
    if missing:
        raise UserError(f"no evaluation for {', '.join(missing)}; run `dvc repro` (compare needs evaluate@<backbone>)")
    val, _, val_mean = ensemble_probabilities([args.plots_dir / bb / "val_predictions.csv" for bb in backbones])
    test, classes, test_mean = ensemble_probabilities([args.plots_dir / bb / "predictions.csv" for bb in backbones])
    # One backbone: the ensemble is that model, already calibrated (predict and export apply no second T).
    temperature, status = 1.0, "not fitted: one backbone" if len(backbones) == 1 else "not fitted: train.calibration"
    if params["train"]["calibration"] == "temperature" and len(backbones) > 1:
        index = {c: i for i, c in enumerate(classes)}
        temperature, status = fit_temperature(val_mean, val.actual.map(index).to_numpy())
        if status != "fitted":
            log.warning("compare: the ensemble's temperature %s; T = 1", status)
    val_probs, probs = apply_temperature(val_mean, temperature), apply_temperature(test_mean, temperature)
    rows = []
    for bb in backbones:
        model = read_json(args.plots_dir / bb / "model.json")
        extra = {"params_total": model["model_params"]["total"], "params_trainable": model["model_params"]["trainable"]}
        extra |= cv_columns(read_json(args.cv_metrics / f"{bb}.json"))
        rows.append(summary_row(bb, read_json(args.plots_dir / bb / "report.json"), extra))
    name = "ensemble (" + " + ".join(backbones) + ")"
    write_predictions(args.ensemble_dir / "val_predictions.csv", list(val.path), list(val.actual), val_probs, classes)
    ensemble = evaluate_and_write(
        name,
        list(test.path),
        list(test.actual),
        probs,
        classes,
        args.ensemble_metrics,
        args.ensemble_dir,
        evaluate["bootstrap"],
        evaluate["confidence"],
        params["base"]["seed"],
        validation=accuracy_and_loss(list(val.actual), val_probs, classes)
        | {"loss_uncalibrated": accuracy_and_loss(list(val.actual), val_mean, classes)["loss"]},
        groups=list(test.group) if "group" in test else None,
        uncalibrated=test_mean,
        temperature=temperature,
        bins=evaluate["calibration_bins"],
        before_label="members calibrated, averaged",
    )
    rows.append(summary_row("ensemble", ensemble, {}))
    summary = pd.DataFrame(rows)
    best = pick_best(summary)

    write_json(
        args.ensemble_record,
        {"backbones": backbones, "classes": classes, "temperature": temperature, "temperature_status": status},
    )
    write_json(
        args.summary,
        {
            "best": best,
            "best_by": "validation accuracy, then validation loss",
            "ci_level": evaluate["confidence"],
            "models": {row["model"]: {k: v for k, v in row.items() if k != "model"} for row in rows},
        },
    )
    write_csv(summary, args.out_dir / "summary.csv")
    table = markdown_table(summary, evaluate["confidence"])
    write_text(
        args.out_dir / "summary.md",
        f"# Backbones compared\n\nBest on the validation split: **{best}**. Test numbers, with bootstrap "
        f"intervals, estimate how good each model is; they are not used to choose.\n\n{table}",
    )
    comparison_plot(summary, args.out_dir / "comparison.png")
    log.info("compare: best on validation: %s\n%s", best, table)


if __name__ == "__main__":
    main()
