"""balance: oversample the training split (train only; val and test keep the true distribution).

python -m stages.balance --split-dir data/split --out data/balanced/train.csv --metrics metrics/data.json
"""

import argparse
from pathlib import Path

from imgclf.core.errors import log, stage_main
from imgclf.core.io import read_csv, write_csv, write_json
from imgclf.data.scan import class_counts
from imgclf.data.split import balance_train
from imgclf.params import load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()

    splits = {name: read_csv(args.split_dir / f"{name}.csv") for name in ("train", "val", "test")}
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
    write_json(args.metrics, {"rows": rows})
    log.info("balance (%s): train %s -> %s", params["balance"]["method"], counts["train_before"], counts["train_after"])


if __name__ == "__main__":
    main()
