"""prepare: scan data.root into a manifest with one row for every file found.

python -m stages.prepare --out-dir data/prepared --metrics metrics/prepare.json
"""

import argparse
import time
from pathlib import Path

import pandas as pd

from imgclf.core.errors import log, stage_main
from imgclf.core.io import write_csv, write_json
from imgclf.data.groups import (
    chance_pairs,
    group_confirmed,
    linked_splits,
    near_duplicate_pairs,
    pairs_apart,
    resolve_conflicts,
)
from imgclf.data.images import ImageRecipe
from imgclf.data.scan import ScanOptions, check_classes, scan_folder, summary_line
from imgclf.data.subjects import check_rule, join_groups, load_key, subject_keys
from imgclf.params import load_params

SUBJECTS_TABLE = Path("logs/subjects.csv")


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    data = load_params()["data"]

    options = ScanOptions(
        min_side=data["min_side"],
        recipe=ImageRecipe.from_params(data),
        perceptual_hash=data["near_duplicates"] != "off",
    )
    groups = data["groups"]
    check_rule(data["root"], groups)
    key = load_key() if groups["by"] != "none" else b""
    thumbnails: dict = {}
    manifest = scan_folder(data["root"], options, thumbnails)
    manifest, conflicts = resolve_conflicts(manifest, data["label_conflicts"], data["use_provided_splits"])
    classes = check_classes(manifest)
    pairs, subjects, chance = None, None, 0.0
    if data["near_duplicates"] != "off":
        start = time.perf_counter()
        pairs = near_duplicate_pairs(
            manifest, data["near_duplicate_distance"], thumbnails, data["near_duplicate_correlation"]
        )
        searched = time.perf_counter() - start
        chance = chance_pairs(pairs.hashes, data["near_duplicate_distance"])
        confirmed = int(pairs.confirmed.sum())
        log.info(
            "prepare: %d near-duplicate candidates (perceptual hash distance <= %d; about %.0f expected by chance "
            "alone from random pairs of these images' hashes), %d confirmed (thumbnail correlation >= %s; %d "
            "across labels), %d rejected -> %s, in %.1f s",
            len(pairs), data["near_duplicate_distance"], chance, confirmed, data["near_duplicate_correlation"],
            pairs.across_labels(), len(pairs) - confirmed, args.out_dir / "near_duplicates.csv", searched,
        )  # fmt: skip
        if chance > 0.5 * len(pairs) and len(pairs) > 10:
            log.warning(
                "prepare: most near-duplicate candidates are what chance alone gives on these images: the hash "
                "cannot tell them apart, and the thumbnail confirmation decides (rejected pairs are listed in %s)",
                args.out_dir / "near_duplicates.csv",
            )
        pairs.write_csv(args.out_dir / "near_duplicates.csv")
        del thumbnails  # 1 KB an image: not needed past the scores
        if data["near_duplicates"] == "group":
            manifest = group_confirmed(manifest, pairs)
        elif confirmed:
            log.warning(
                "prepare: data.near_duplicates=report: the %d confirmed near-copy pairs are listed, not kept "
                "together; %d of them have their images in different groups, so possibly in two splits",
                confirmed, pairs_apart(manifest, pairs),
            )  # fmt: skip
    if groups["by"] != "none":
        # Subjects (patients) join the content groups; no output holds them (imgclf/data/subjects.py).
        subjects = subject_keys(manifest, data["root"], groups, key)
        manifest = join_groups(manifest, subjects)
        kept_rows = manifest.loc[subjects.index]
        per_class = subjects.groupby(kept_rows.label).nunique()
        log.info(
            "prepare: %d subjects (data.groups.by=%s) %s; keyed hashes per file in %s (not committed)",
            subjects.nunique(), groups["by"], per_class.to_dict(), SUBJECTS_TABLE,
        )  # fmt: skip
        # For the data steward only (which files are patient X's?): git-ignored, no DVC output (see subjects.py).
        write_csv(pd.DataFrame({"path": kept_rows.path, "subject": subjects}), SUBJECTS_TABLE)
    # The provided test/validation folders each kept row is linked to (same content, a confirmed near-copy with
    # data.near_duplicates: group, the same subject): split holds such rows out, pair by pair.
    grouped = pairs if data["near_duplicates"] == "group" else None
    manifest["linked_to"] = ""
    ok = manifest.status == "ok"
    manifest.loc[ok, "linked_to"] = linked_splits(manifest, grouped, subjects)
    sizes = manifest[ok].groupby("group").size()
    largest = int(sizes.max()) if len(sizes) else 0
    if len(sizes) and largest > 1:
        log.info(
            "prepare: %d groups of several files (copies, confirmed near-copies%s), the largest %d",
            int((sizes > 1).sum()), ", subjects" if subjects is not None else "", largest,
        )  # fmt: skip

    write_csv(manifest, args.out_dir / "manifest.csv")
    write_csv(conflicts, args.out_dir / "label_conflicts.csv")
    kept = manifest[manifest.status == "ok"]
    metrics = {
        "found": len(manifest),
        "kept": len(kept),
        "skipped": int((manifest.status == "skipped").sum()),
        "classes": len(classes),
        "label_conflict_files": len(conflicts),
    }
    if pairs is not None:
        metrics["near_duplicate_candidates"] = len(pairs)
        metrics["near_duplicate_confirmed"] = int(pairs.confirmed.sum())
        metrics["near_duplicate_rejected"] = len(pairs) - metrics["near_duplicate_confirmed"]
        metrics["near_duplicate_chance"] = round(chance, 1)  # candidates expected from chance alone
    # files in the largest group (copies, confirmed near-copies, a subject's files): 1 when none
    metrics["largest_group"] = largest
    if groups["by"] != "none":
        metrics["subjects"] = int(subjects.nunique())
    write_json(args.metrics, metrics)
    log.info("prepare: %s in %s", summary_line(manifest), data["root"])
    within = conflicts[conflicts.kept.astype(bool)].groupby("sha256")["label"].nunique()
    if (within > 1).any():
        log.warning(
            "prepare: %d image(s) appear under two labels inside the provided test or validation folder: kept as "
            "given (the provided split is not changed); see %s", int((within > 1).sum()),
            args.out_dir / "label_conflicts.csv",
        )  # fmt: skip
    if len(conflicts):
        log.warning(
            "prepare: %d files share content across labels; see %s",
            len(conflicts),
            args.out_dir / "label_conflicts.csv",
        )


if __name__ == "__main__":
    main()
