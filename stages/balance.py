"""balance: oversample the training split (train only; val and test keep the true distribution).

python -m stages.balance --split-dir data/split --label-issues plots/data/label_issues.csv \
    --out data/balanced/train.csv --metrics metrics/data.json

With `label_issues.exclude: true`, the training split loses the files label_issues listed (before balancing;
validation and test keep theirs), and metrics/data.json counts them (rows.excluded_label_issues).
"""

import argparse
from pathlib import Path

from imgclf.core.errors import UserError, log, stage_main
from imgclf.core.io import read_csv, write_csv, write_json
from imgclf.data.scan import class_counts
from imgclf.data.split import balance_train
from imgclf.params import load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-dir", type=Path, required=True)
    parser.add_argument("--label-issues", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()

    splits = {name: read_csv(args.split_dir / f"{name}.csv") for name in ("train", "val", "test")}
    excluded = 0
    if params["label_issues"]["exclude"]:
        listed = set(read_csv(args.label_issues).path)
        if not listed:
            log.warning(
                "balance: label_issues.exclude is on, but %s lists no image (is cv.folds 0?): nothing excluded",
                args.label_issues,
            )
        keep = ~splits["train"].path.isin(listed)
        excluded = int((~keep).sum())
        before = set(splits["train"].label)
        splits["train"] = splits["train"][keep].reset_index(drop=True)
        log.info("balance: %d training file(s) excluded as suspected label errors (label_issues.exclude)", excluded)
        missing = sorted(before - set(splits["train"].label))
        if missing:
            raise UserError(
                f"label_issues.exclude leaves no training image of class(es) {', '.join(map(repr, missing))}; "
                "set it to false and review plots/data/label_issues.csv by hand"
            )
    balanced = balance_train(splits["train"], params["balance"]["method"], params["base"]["seed"])
    write_csv(balanced, args.out)
    counts = {
        "train_before": class_counts(splits["train"]),
        "train_after": class_counts(balanced),
        "val": class_counts(splits["val"]),
        "test": class_counts(splits["test"]),
    }
    # Tracked as metrics: the row counts (five numbers). The per-class counts are logged and shown by eda.
    rows = {k: sum(v.values()) for k, v in counts.items()}
    rows["held_out"] = len(read_csv(args.split_dir / "held_out.csv"))  # copies of provided test/val images
    rows["excluded_label_issues"] = excluded
    write_json(args.metrics, {"rows": rows})
    log.info("balance (%s): train %s -> %s", params["balance"]["method"], counts["train_before"], counts["train_after"])


if __name__ == "__main__":
    main()
