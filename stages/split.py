"""split: stratified train/val/test lists; identical files (same sha256) always share a split.

python stages/split.py --manifest data/prepared/manifest.csv --out-dir data/split
"""

import argparse
from pathlib import Path

import pandas as pd

from imgclf.data import class_counts, split_manifest
from imgclf.errors import log, stage_main
from imgclf.io import write_csv
from imgclf.params import load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()

    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    splits = split_manifest(
        manifest,
        val=params["split"]["val"],
        test=params["split"]["test"],
        seed=params["base"]["seed"],
        use_provided_splits=params["data"]["use_provided_splits"],
    )
    for name, frame in splits.items():
        write_csv(frame, args.out_dir / f"{name}.csv")
        log.info("split: %-5s %4d images %s", name, len(frame), class_counts(frame))


if __name__ == "__main__":
    main()
