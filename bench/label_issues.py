"""How well does the label-issue list find misfiled images? Measured on real images with known errors.

    python bench/label_issues.py [--per-class 100] [--misfiled 24] [--backbones vgg16 mobilenet] [--size 64]

Builds a 4-class folder from the bundled sample's classes (dress, coat, sneaker, ankle boot), drawn from the
Fashion-MNIST training file that Debian's `dataset-fashion-mnist` installs (/usr/share/datasets/fashion-mnist),
moves `--misfiled` images into a wrong class folder, runs the pipeline up to `label_issues` in a temporary
project with `cv.folds: 5`, and reports, for the misfiled images that landed in train + validation (the test
split is never cross-validated): how many the list flags, how many are in its top 48, and the precision of the
list and of its top 48. Random-init backbones (`features.weights: none`: ImageNet weights cannot be fetched
here), so this is a floor for what pretrained weights give. Writes bench/results-label-issues.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import dvc, make_project  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/machine.py)

from imgclf.core.io import read_csv  # noqa: E402
from imgclf.results.crossval import pool  # noqa: E402

CLASSES = {3: "dress", 4: "coat", 7: "sneaker", 9: "ankle_boot"}  # the bundled sample's four (data/sample)
SOURCE = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    import gzip

    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--misfiled", type=int, default=24)
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "mobilenet"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    labels = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(
            Path(tmp),
            {
                "data.root": "images",
                "backbones": args.backbones,
                "features.weights": "none",
                "features.image_size": args.size,
                "cv.folds": 5,
            },
        )
        root = project / "images"
        files = []
        for label, name in CLASSES.items():
            (root / name).mkdir(parents=True)
            for i in rng.choice(np.flatnonzero(labels == label), args.per_class, replace=False):
                path = root / name / f"fmnist_train_{i:05d}.png"
                Image.fromarray(images[i]).save(path)
                files.append(path)
        names = list(CLASSES.values())
        moved: dict[str, str] = {}
        for k, i in enumerate(rng.choice(len(files), args.misfiled, replace=False)):
            src = files[i]
            wrong = names[(names.index(src.parent.name) + 1 + k % 3) % 4]
            target = root / wrong / src.name
            src.rename(target)
            moved[target.relative_to(root).as_posix()] = src.parent.name
        start = time.perf_counter()
        dvc(project, "repro", "label_issues")
        seconds = time.perf_counter() - start
        split = pool(read_csv(project / "data/split/train.csv"), read_csv(project / "data/split/val.csv"))
        in_pool = set(moved) & set(split.path)
        issues = read_csv(project / "plots/data/label_issues.csv")
        listed, top = set(issues.path), set(issues.path[:48])
        suggested = dict(zip(issues.path, issues.suggested, strict=True))
        cv = {bb: json.loads((project / f"metrics/cv/{bb}.json").read_text()) for bb in args.backbones}
        result = {
            "machine": cpu_model(),
            "command": "python bench/label_issues.py " + " ".join(sys.argv[1:]),
            "images": args.per_class * 4,
            "misfiled": args.misfiled,
            "misfiled_in_train_val": len(in_pool),
            "train_val_images": len(split),
            "backbones": args.backbones,
            "image_size": args.size,
            "listed": len(listed),
            "listed_misfiled": len(listed & in_pool),
            "top48_misfiled": len(top & in_pool),
            "recall_list": round(len(listed & in_pool) / max(1, len(in_pool)), 3),
            "precision_list": round(len(listed & in_pool) / max(1, len(listed)), 3),
            "recall_top48": round(len(top & in_pool) / max(1, len(in_pool)), 3),
            "precision_top48": round(len(top & in_pool) / max(1, min(48, len(listed))), 3),
            "suggested_the_true_class": sum(suggested[p] == moved[p] for p in listed & in_pool),
            "cv_accuracy": {bb: cv[bb]["accuracy"] for bb in args.backbones},
            "seconds_up_to_label_issues": round(seconds, 1),
        }
    out = ROOT / "bench" / "results-label-issues.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
