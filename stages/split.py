"""split: stratified train/val/test lists; a group (identical files, near-copies, one subject) shares a split.

python -m stages.split --manifest data/prepared/manifest.csv --out-dir data/split
"""

import argparse
from pathlib import Path

from imgclf.core.errors import log, stage_main
from imgclf.core.io import read_csv, write_csv
from imgclf.data.imagelist import unique_images
from imgclf.data.scan import class_counts
from imgclf.data.split import group_counts, group_key, held_out, spanning_groups, split_manifest
from imgclf.params import load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()

    manifest = read_csv(args.manifest)
    splits = split_manifest(
        manifest,
        val=params["split"]["val"],
        test=params["split"]["test"],
        seed=params["base"]["seed"],
        use_provided_splits=params["data"]["use_provided_splits"],
    )
    groups = group_counts(splits)
    for name, frame in splits.items():
        write_csv(frame, args.out_dir / f"{name}.csv")
        log.info(
            "split: %-5s %4d images %s in %d groups %s",
            name, len(frame), class_counts(frame), sum(groups[name].values()), groups[name],
        )  # fmt: skip
    spanning = spanning_groups(manifest)
    if len(spanning):
        log.warning(
            "split: %d group(s) (a subject, or copies) have images in more than one provided split folder (%d "
            "images, e.g. %s); the provided test and validation folders stay as given, and the group's images "
            "linked to them (copies, confirmed near-copies, the same subject) are held out",
            group_key(spanning).nunique(), len(spanning), spanning.path.iloc[0],
        )  # fmt: skip
    held = held_out(manifest, splits)
    write_csv(held, args.out_dir / "held_out.csv")
    if len(held):
        log.warning(
            "split: %d image(s) held out of every split: each a copy, a confirmed near-copy or the same subject as "
            "a provided test or validation image, found in another folder (the provided folders stay as given); "
            "listed in %s",
            len(held), args.out_dir / "held_out.csv",
        )  # fmt: skip
    # The images the backbone passes read, one row per content: features@ depends on this list alone, so a
    # change of the split ratios (which moves images between splits) does not rerun a backbone pass.
    write_csv(unique_images(list(splits.values())), args.out_dir / "images.csv")
    kept = manifest[manifest.status == "ok"]
    sizes = kept.groupby("group").size() if "group" in kept else None
    if sizes is not None and len(sizes) and sizes.max() > 1:
        log.info(
            "split: %d groups of identical or near-identical images, or of one subject, kept together (largest: "
            "%d images, group %s)",
            int((sizes > 1).sum()), int(sizes.max()), sizes.idxmax()[:12],
        )  # fmt: skip
        if sizes.max() > 0.5 * min(params["split"]["val"], params["split"]["test"]) * len(kept):
            log.warning(
                "split: one group holds %d of %d images, more than half a validation or test share: the split "
                "cannot follow the ratios; see data/prepared/near_duplicates.csv (confirmed pairs) and consider "
                "raising data.near_duplicate_correlation, or check the subject rule (data.groups)",
                int(sizes.max()), len(kept),
            )  # fmt: skip


if __name__ == "__main__":
    main()
