"""label_issues: the train + validation images whose given label the cross-validated models disagree with.

    python -m stages.label_issues --cv-dir plots/cv --manifest data/prepared/manifest.csv \
        --out plots/data/label_issues.csv \
        --picture plots/data/label_issues.png

Combines the out-of-fold probabilities of every backbone in params.yaml (and every repeat) by averaging
them, as the ensemble does, then ranks with cleanlab's confident learning (imgclf.results.crossval). A report,
never a relabel: only `label_issues.exclude: true` drops the listed files, from the training split, in the
balance stage. With cross-validation off (`cv.folds: 0`) both outputs say so and are otherwise empty.
"""

import argparse
from pathlib import Path

from imgclf.core.errors import log, stage_main
from imgclf.core.io import read_csv, write_csv
from imgclf.data.images import ImageRecipe
from imgclf.params import images_shown, load_params
from imgclf.results.crossval import ISSUE_COLUMNS, combined_probabilities, rank_label_issues
from imgclf.results.plots import label_issue_grid


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--cv-dir", "--manifest", "--out", "--picture"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    backbones = params["backbones"]
    oof = {bb: read_csv(args.cv_dir / bb / "oof.csv") for bb in backbones}
    images, classes, probs = combined_probabilities(oof)
    ranked = rank_label_issues(list(images.label), classes, probs)
    table = ranked.assign(
        rank=range(1, len(ranked) + 1),
        path=images.path.to_numpy()[ranked.row.to_numpy()] if len(ranked) else [],
        score=[f"{s:.6f}" for s in ranked.score],
        backbones="+".join(backbones),
    )[ISSUE_COLUMNS]
    write_csv(table, args.out)
    if len(images) == 0:
        note = "cross-validation is off (cv.folds: 0): no label issues computed"
    elif table.empty:
        note = f"no label issues among {len(images)} images"
    else:
        note = f"{len(table)} suspected label errors: see {args.out} (label_issues.show is 0)"
    show = bool(len(table) and params["label_issues"]["show"])
    if show:  # patients' images? DICOM anywhere in the dataset (as eda decides)
        manifest = read_csv(args.manifest)
        dicom_read = bool(((manifest.status == "ok") & (manifest.format == "DICOM")).any())
        show = images_shown(params["data"], dicom_read, "label_issues")
        if not show:
            note = f"{len(table)} suspected label errors: see {args.out} (pictures withheld: data.show_images)"
    label_issue_grid(
        table.head(params["label_issues"]["show"] if show else 0),
        params["data"]["root"],
        args.picture,
        recipe=ImageRecipe.from_params(params["data"]),
        note=note,
    )
    if len(images):
        log.info(
            "label_issues: %d of %d train + validation images flagged (out-of-fold probabilities of %s, averaged)",
            len(table),
            len(images),
            " + ".join(backbones),
        )
    else:
        log.info("label_issues: off (cv.folds: 0)")


if __name__ == "__main__":
    main()
