"""eda: class count plot, pie chart and a grid of sample images per class, from the manifest.

python -m stages.eda --manifest data/prepared/manifest.csv --train data/split/train.csv --out-dir plots/eda
"""

import argparse
from pathlib import Path

import pandas as pd

from imgclf.core.errors import stage_main
from imgclf.core.io import read_csv, write_csv
from imgclf.data.augment import AugmentParams, augment_preview
from imgclf.data.images import ImageRecipe
from imgclf.data.scan import class_counts
from imgclf.params import images_shown, load_params
from imgclf.results.plots import class_count_plot, class_pie_chart, sample_grid, withheld_picture


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()

    manifest = read_csv(args.manifest)
    kept = manifest[manifest.status == "ok"]
    counts = class_counts(kept)
    write_csv(pd.DataFrame({"label": list(counts), "count": list(counts.values())}), args.out_dir / "class_counts.csv")
    class_count_plot(counts, args.out_dir / "class_counts.png")
    class_pie_chart(counts, args.out_dir / "class_pie.png")
    dicom_read = bool((kept.format == "DICOM").any())  # patients' images? (the same test in evaluate, label_issues)
    if not images_shown(params["data"], dicom_read, "eda"):  # patient data: the charts stay, no pixels drawn
        withheld_picture(args.out_dir / "samples.png", "Sample images per class")
        withheld_picture(args.out_dir / "augmented.png", "Augmentation preview")
        return
    sample_grid(
        kept,
        params["data"]["root"],
        args.out_dir / "samples.png",
        per_class=params["eda"]["samples_per_class"],
        seed=params["base"]["seed"],
        image_size=params["features"]["image_size"],
        recipe=ImageRecipe.from_params(params["data"]),
    )
    augment_preview(
        kept,
        params["data"]["root"],
        args.out_dir / "augmented.png",
        AugmentParams.from_params(params["augment"]),
        seed=params["base"]["seed"],
        image_size=params["features"]["image_size"],
        recipe=ImageRecipe.from_params(params["data"]),
    )


if __name__ == "__main__":
    main()
