"""compare: all backbones side by side, plus their soft-voting ensemble evaluated like a backbone.

    python stages/compare.py --metrics-dir metrics/backbones --plots-dir plots/backbones --models-dir models \
        --features-dir data/features --summary metrics/summary.json --ensemble-metrics metrics/ensemble.json \
        --ensemble-dir plots/ensemble --out-dir plots/compare
"""

import argparse
from pathlib import Path

import pandas as pd

from imgclf.compare import ensemble_probabilities, markdown_table, summary_row
from imgclf.errors import UserError, log, stage_main
from imgclf.evaluation import evaluate_and_write
from imgclf.io import read_json, write_csv, write_json, write_text
from imgclf.params import load_params
from imgclf.plots import comparison_plot


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in (
        "--metrics-dir", "--plots-dir", "--models-dir", "--features-dir", "--summary", "--ensemble-metrics",
        "--ensemble-dir", "--out-dir",
    ):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    evaluate = params["evaluate"]
    backbones = params["backbones"]

    missing = [bb for bb in backbones if not (args.metrics_dir / f"{bb}.json").is_file()]
    if missing:
        raise UserError(f"no evaluation for {', '.join(missing)}; run `dvc repro` (compare needs evaluate@<backbone>)")
    rows = []
    for bb in backbones:
        metrics = read_json(args.metrics_dir / f"{bb}.json")
        model_info = read_json(args.models_dir / bb / "info.json")
        features_info = read_json(args.features_dir / bb / "info.json")
        rows.append(
            summary_row(
                bb,
                metrics,
                {
                    "params_total": model_info["model_params"]["total"],
                    "params_trainable": model_info["model_params"]["trainable"],
                    "features_seconds": features_info["seconds"],
                    "train_seconds": model_info["train_seconds"],
                },
            )
        )
    test, classes, probs = ensemble_probabilities([args.plots_dir / bb / "predictions.csv" for bb in backbones])
    ensemble = evaluate_and_write(
        "ensemble (" + " + ".join(backbones) + ")",
        list(test.path),
        list(test.actual),
        probs,
        classes,
        args.ensemble_metrics,
        args.ensemble_dir,
        evaluate["bootstrap"],
        evaluate["confidence"],
        params["base"]["seed"],
    )
    rows.append(summary_row("ensemble", ensemble, {}))
    summary = pd.DataFrame(rows)

    # Timings vary run to run: they go in the table, not in the metrics (which must repeat byte for byte).
    deterministic = {
        row["model"]: {k: v for k, v in row.items() if k not in ("model", "features_seconds", "train_seconds")}
        for row in rows
    }
    best = summary.sort_values("accuracy", ascending=False, kind="stable").iloc[0]
    write_json(args.summary, {"models": deterministic, "best": best.model, "ci_level": evaluate["confidence"]})
    write_csv(summary, args.out_dir / "summary.csv")
    table = markdown_table(summary, evaluate["confidence"])
    write_text(args.out_dir / "summary.md", f"# Backbones compared on the test split\n\n{table}")
    comparison_plot(summary, args.out_dir / "comparison.png")
    log.info("compare:\n%s", table)


if __name__ == "__main__":
    main()
