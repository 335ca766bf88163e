"""70,000 real images end to end (issue 24): Debian's Fashion-MNIST through the whole DVC pipeline, then 1% more.

    apt-get install -y dataset-fashion-mnist           # 70,000 28x28 grayscale images, 10 classes
    python bench/fashion70k.py [--work /tmp/imgclf-fashion70k] [--backbone mobilenet] [--size 96] [--epochs 5]

1. Writes the images once as PNG (`<work>/project/images/Training/<class>/`, `.../Testing/<class>/`), but
   holds back the last 700 training images (1%) in `<work>/new/`.
2. Makes a DVC project there with this repository's code and pipeline: one backbone, `--size` px,
   `features.weights: none` (ImageNet weights cannot be downloaded here; speed and memory do not depend on the
   weights' values, accuracy does: it is not reported), `--epochs` head epochs.
3. Runs each stage with `dvc repro --single-item`, one process at a time, and records its wall time (DVC's
   own work included: hashing the 70,000-file data folder for prepare) and peak RSS (from wait4: the largest
   process of the two, DVC or the stage script; DVC's is about 150 MB, so a light stage shows DVC's).
4. Moves the 700 held-back images into Training and runs again: `features@` must compute only them. (So the
   first run has 69,300 images and the second 70,000.)
5. The near-copy rule on the 70,000 images: candidates, confirmed pairs, the largest group, training images
   held out, confirmed pairs in two splits (must be 0), and the time of the thumbnails and their correlations.
`--until-split` runs prepare, eda and split only (the near-copy rule, a few minutes), into the key until_split.

Writes bench/results-fashion70k.json and prints a markdown table. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench/results-fashion70k.json"
SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
HELD_BACK = 700
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "imgclf", "pyproject.toml", ".gitignore", ".dvcignore"]


def idx(name: str) -> Any:
    """An IDX file (the MNIST format) as a NumPy array."""
    import numpy as np

    with gzip.open(SOURCE / name) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_images(work: Path) -> None:
    """The PNG folders, once (a marker file says they are complete)."""
    from PIL import Image

    done = work / "images.done"
    if done.is_file():
        return
    for folder in ("project/images", "new"):
        shutil.rmtree(work / folder, ignore_errors=True)
    parts = {"Training": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "Testing": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip
    for part, (images_file, labels_file) in parts.items():
        images, labels = idx(images_file), idx(labels_file)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            held = part == "Training" and i >= len(images) - HELD_BACK
            folder = work / ("new" if held else "project/images") / part / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{part.lower()}_{i:05d}.png")
    done.write_text("ok\n")


def copy_pipeline(project: Path) -> None:
    """This repository's pipeline and code into `project` (its images are the caller's)."""
    (project / "weights").mkdir()  # a dependency of features@ (dvc.yaml), even when empty
    shutil.copy2(ROOT / "weights/README.md", project / "weights/README.md")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, project / name)


def make_project(work: Path, backbone: str, size: int, epochs: int) -> Path:
    import yaml

    project = work / "project"  # everything but the images is made afresh
    for old in project.iterdir():
        if old.name != "images":
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    copy_pipeline(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["root"] = "images"
    params["backbones"] = [backbone]
    params["features"]["image_size"] = size
    params["features"]["weights"] = "none"
    params["features"]["precision_overrides"] = {backbone: None}
    params["train"]["epochs"] = epochs
    params["train"]["overrides"] = {backbone: {}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=project, check=True)
    return project


def run_stage(project: Path, stage: str) -> dict[str, float]:
    """One stage by DVC, alone: wall seconds and the peak RSS (GB) of the largest process it ran."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=open(project / f"stage-{stage.replace('@', '-')}.err", "w"),  # noqa: SIM115
    )
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"{stage} failed; see {project}/stage-{stage.replace('@', '-')}.err")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def log_line(project: Path, pattern: str) -> str:
    lines = [line for line in (project / "logs/imgclf.log").read_text().splitlines() if re.search(pattern, line)]
    return lines[-1] if lines else ""


def pipeline(project: Path, backbone: str) -> dict[str, object]:
    stages = ["prepare", "eda", "split", f"features@{backbone}", f"cv@{backbone}", "label_issues", "balance",
              f"augment@{backbone}", f"train@{backbone}", f"evaluate@{backbone}", "compare"]  # fmt: skip
    timings = {}
    for stage in stages:
        timings[stage] = run_stage(project, stage)
        print(stage, timings[stage], flush=True)
    return {
        "stages": timings,
        "prepare_log": log_line(project, r"prepare: \d+ near-duplicate candidates"),
        "features_log": log_line(project, rf"features@{backbone}: \d+ images"),
        "kept": json.loads((project / "metrics/prepare.json").read_text())["kept"],
    }


def near_copies(project: Path, max_distance: int = 4) -> dict[str, object]:
    """The near-copy rule on the run's own images: candidates, confirmed pairs, groups, what split held out, and
    what confirmation costs (the thumbnails made while prepare decodes, and their correlations) beside prepare."""
    import numpy as np
    import pandas as pd

    from imgclf.data.groups import confirmation_thumbnail, hamming_pairs, thumbnail_correlation
    from imgclf.data.images import DEFAULT_RECIPE, decode_image

    prepared = project / "data/prepared"
    manifest = pd.read_csv(prepared / "manifest.csv", dtype=str, keep_default_na=False)
    pairs = pd.read_csv(prepared / "near_duplicates.csv", dtype={"path_a": str, "path_b": str})
    held = pd.read_csv(project / "data/split/held_out.csv", dtype=str, keep_default_na=False)
    ok = manifest[manifest.status == "ok"]
    contents = ok.sort_values("path").drop_duplicates("sha256").reset_index(drop=True)
    decoded = [decode_image(project / "images" / p, DEFAULT_RECIPE)[0] for p in contents.path]
    start = time.perf_counter()
    thumbs = np.stack([confirmation_thumbnail(im) for im in decoded])
    thumbnail_seconds = time.perf_counter() - start
    hashes = np.array([int(h, 16) for h in contents.phash], dtype=np.uint64)
    start = time.perf_counter()
    a, b, _ = hamming_pairs(hashes, max_distance)
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    thumbnail_correlation(thumbs, a, b)
    score_seconds = time.perf_counter() - start
    sizes = ok.groupby("group").size()
    labels = ok[ok.group == sizes.idxmax()].label.value_counts()
    home = {}
    for name in ("train", "val", "test"):
        home.update(dict.fromkeys(pd.read_csv(project / f"data/split/{name}.csv", dtype=str).path, name))
    confirmed = pairs[pairs.confirmed]
    placed = [(home.get(x), home.get(y)) for x, y in zip(confirmed.path_a, confirmed.path_b, strict=True)]
    crossing = sum(x is not None and y is not None and x != y for x, y in placed)  # held-out images are in none
    training = ok[ok.provided_split == "train"]
    return {
        "contents": len(contents),
        "candidates": len(pairs),
        "confirmed": len(confirmed),
        "confirmed_across_labels": int((confirmed.label_a != confirmed.label_b).sum()),
        "largest_group": int(sizes.max()),
        "largest_group_labels": {k: int(v) for k, v in labels.items()},
        "training_images_held_out": len(held),
        "training_images_held_out_share": round(len(held) / len(training), 4),
        "confirmed_pairs_in_two_splits": int(crossing),
        "thumbnails_seconds": round(thumbnail_seconds, 2),
        "search_seconds": round(search_seconds, 2),
        "confirmation_seconds": round(score_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf-fashion70k"))
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--until-split", action="store_true", help="prepare, eda and split only: the near-copy rule")
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} not found: apt-get install -y dataset-fashion-mnist")
    from machine import cpu_model

    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_images(args.work)
    written = time.perf_counter() - start
    project = make_project(args.work, args.backbone, args.size, args.epochs)
    if args.until_split:
        stages = {name: run_stage(project, name) for name in ("prepare", "eda", "split")}
        result = {
            "machine": cpu_model(),
            "cores": os.cpu_count(),
            "command": "python bench/fashion70k.py --until-split",
            "stages": stages,
            "prepare_log": [log_line(project, p) for p in (r"prepare: \d+ near-duplicate", r"prepare: done in")],
            "near_copies": near_copies(project),
        }
        old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        RESULTS.write_text(json.dumps({**old, "until_split": result}, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    first = pipeline(project, args.backbone)
    for src in sorted((args.work / "new").rglob("*.png")):  # the 1% more, into Training
        target = project / "images" / src.relative_to(args.work / "new")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, target)
    (args.work / "images.done").unlink()  # the folders no longer hold the first state
    second = pipeline(project, args.backbone)
    result = {
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "command": f"python bench/fashion70k.py --backbone {args.backbone} --size {args.size} --epochs {args.epochs}",
        "png_write_seconds": round(written, 1),
        "first_run": first,
        "after_adding_1_percent": second,
        "near_copies": near_copies(project),
    }
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**result, **{k: v for k, v in old.items() if k == "until_split"}}, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
