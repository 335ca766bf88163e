"""prepare: scan data.root into a manifest with one row for every file found.

python -m stages.prepare --out-dir data/prepared --metrics metrics/prepare.json
"""

import argparse
import time
from pathlib import Path

import pandas as pd

from imgclf.core.errors import log, stage_main
from imgclf.core.io import write_csv, write_json
from imgclf.data.groups import group_near_duplicates, near_duplicate_pairs, pairs_apart, resolve_conflicts
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
    manifest = scan_folder(data["root"], options)
    manifest, conflicts = resolve_conflicts(manifest, data["label_conflicts"])
    classes = check_classes(manifest)
    pairs, largest = None, None
    if data["near_duplicates"] != "off":
        start = time.perf_counter()
        pairs = near_duplicate_pairs(manifest, data["near_duplicate_distance"])
        searched = time.perf_counter() - start
        grouping = ""
        if data["near_duplicates"] == "group":
            manifest = group_near_duplicates(manifest, pairs)
            sizes = manifest[manifest.status == "ok"].groupby("group").size()
            largest = int(sizes.max()) if len(sizes) else 0
            grouping = f"; {int((sizes > 1).sum())} groups of several files, the largest {largest}"
        log.info(
            "prepare: %d near-duplicate pairs (perceptual hash distance <= %d; %d across labels) -> %s, "
            "found in %.1f s (data.near_duplicates=%s)%s",
            len(pairs), data["near_duplicate_distance"], pairs.across_labels(),
            args.out_dir / "near_duplicates.csv", searched, data["near_duplicates"], grouping,
        )  # fmt: skip
        pairs.write_csv(args.out_dir / "near_duplicates.csv")
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
        metrics["near_duplicate_pairs"] = len(pairs)
    if largest is not None:  # files in the largest near-copy group (with their exact copies): 1 when none
        metrics["largest_group"] = largest
        # pairs whose two files ended in different groups (after subjects joined), so possibly in two splits
        metrics["near_duplicate_pairs_apart"] = pairs_apart(manifest, pairs)
        log.info(
            "prepare: %d of the %d near-duplicate pairs are in different groups (the grouping rule, README "
            "\"Near-duplicates\"), so possibly in different splits", metrics["near_duplicate_pairs_apart"], len(pairs),
        )  # fmt: skip
    if groups["by"] != "none":
        metrics["subjects"] = int(subjects.nunique())
    write_json(args.metrics, metrics)
    log.info("prepare: %s in %s", summary_line(manifest), data["root"])
    if len(conflicts):
        log.warning(
            "prepare: %d files share content across labels; see %s",
            len(conflicts),
            args.out_dir / "label_conflicts.csv",
        )


if __name__ == "__main__":
    main()
