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
5. Compares near-copy grouping rules on the 70,000 hashes: single linkage (a union of all pairs) against
   the leader rule prepare uses (groups.near_copy_leaders): the largest group and how many pairs end apart.

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


def make_project(work: Path, backbone: str, size: int, epochs: int) -> Path:
    import yaml

    project = work / "project"  # everything but the images is made afresh
    for old in project.iterdir():
        if old.name != "images":
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    (project / "weights").mkdir()  # a dependency of features@ (dvc.yaml), even when empty
    shutil.copy2(ROOT / "weights/README.md", project / "weights/README.md")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, project / name)
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
        "prepare_log": log_line(project, r"prepare: \d+ near-duplicate pairs"),
        "features_log": log_line(project, rf"features@{backbone}: \d+ images"),
        "kept": json.loads((project / "metrics/prepare.json").read_text())["kept"],
    }


def grouping_rules(project: Path, max_distance: int = 4) -> dict[str, object]:
    """Largest near-copy group under single linkage and under the leader rule, on the run's own hashes."""
    import numpy as np
    import pandas as pd

    from imgclf.data.groups import near_copy_leaders, near_duplicate_pairs

    manifest = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str, keep_default_na=False)
    start = time.perf_counter()
    near = near_duplicate_pairs(manifest, max_distance)
    search = time.perf_counter() - start
    count = len(near.contents)
    parent = np.arange(count)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(near.a.tolist(), near.b.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    union = np.array([find(i) for i in range(count)])
    leaders = near_copy_leaders(count, near)
    labels = near.contents.label.to_numpy()

    def summary(group: np.ndarray) -> dict[str, object]:
        sizes = np.bincount(group)
        largest = int(sizes.argmax())
        members = labels[group == largest]
        return {
            "groups_of_several": int((sizes > 1).sum()),
            "largest": int(sizes.max()),
            "largest_labels": {k: int(v) for k, v in pd.Series(members).value_counts().items()},
            "pairs_apart": int((group[near.a] != group[near.b]).sum()),
        }

    return {"contents": count, "pairs": len(near), "search_seconds": round(search, 2),
            "single_linkage": summary(union), "leader": summary(leaders)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf-fashion70k"))
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} not found: apt-get install -y dataset-fashion-mnist")
    from machine import cpu_model

    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_images(args.work)
    written = time.perf_counter() - start
    project = make_project(args.work, args.backbone, args.size, args.epochs)
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
        "grouping": grouping_rules(project),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
