"""prepare: scan data.root into a manifest with one row for every file found.

python stages/prepare.py --out-dir data/prepared --metrics metrics/prepare.json
"""

import argparse
from pathlib import Path

from imgclf.data import ScanOptions, check_classes, resolve_conflicts, scan_folder, summary_line
from imgclf.errors import log, stage_main
from imgclf.io import write_csv, write_json
from imgclf.params import load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    data = load_params()["data"]

    options = ScanOptions(
        min_side=data["min_side"],
        max_pixels=data["max_pixels"],
        background=tuple(data["background"]),
        use_provided_splits=data["use_provided_splits"],
        label_conflicts=data["label_conflicts"],
    )
    manifest = scan_folder(data["root"], options)
    manifest, conflicts = resolve_conflicts(manifest, data["label_conflicts"])
    classes = check_classes(manifest)

    write_csv(manifest, args.out_dir / "manifest.csv")
    write_csv(conflicts, args.out_dir / "label_conflicts.csv")
    kept = manifest[manifest.status == "ok"]
    skipped = manifest[manifest.status == "skipped"]
    assert len(manifest) == len(kept) + len(skipped)
    write_json(
        args.metrics,
        {
            "found": len(manifest),
            "kept": len(kept),
            "skipped": len(skipped),
            "classes": len(classes),
            "label_conflict_files": len(conflicts),
        },
    )
    log.info("prepare: %s in %s", summary_line(manifest), data["root"])
    if len(conflicts):
        log.warning(
            "prepare: %d files share content across labels; see %s",
            len(conflicts),
            args.out_dir / "label_conflicts.csv",
        )


if __name__ == "__main__":
    main()
