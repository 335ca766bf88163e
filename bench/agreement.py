"""Does a bfloat16 backbone pass change the answers? The whole pipeline, run twice per dataset (float32, then
bfloat16), on VGG16 and Xception: test predictions compared image by image, accuracy against the float32
run's bootstrap interval.

    python bench/agreement.py        # the bundled sample and a Training/Testing folder; about 10 minutes

Each run is a fresh copy of this project (tests/helpers.make_project) with `dvc repro`: the head is trained on
each run's own features, so the comparison includes the training's response to the changed features (the
honest question), not only the same head applied to two sets of features. Writes bench/results-agreement.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

BACKBONES = ["vgg16", "xception"]


def datasets(tmp: Path) -> dict[str, tuple[Path, dict]]:
    from helpers import make_dataset

    layout = tmp / "training_testing"
    make_dataset(layout / "Training", {"glioma": 60, "meningioma": 50, "notumor": 40, "pituitary": 30}, size=48)
    make_dataset(layout / "Testing", {"glioma": 20, "meningioma": 16, "notumor": 14, "pituitary": 10}, size=48, seed=1)
    return {
        "bundled sample (600 images, 28 px)": (ROOT / "data/sample", {}),
        "Training/Testing folders (240 + 60 images, 48 px shapes)": (layout, {"data.near_duplicates": "report"}),
    }


def run(root: Path, precision: str, extra: dict, tmp: Path) -> dict:
    from helpers import dvc, make_project

    from imgclf.core.io import read_csv

    (tmp / f"{root.name}-{precision}").mkdir()
    project = make_project(tmp / f"{root.name}-{precision}", {
        "data.root": str(root), "backbones": BACKBONES, "features.precision": precision, **extra,
    })  # fmt: skip
    dvc(project, "repro")
    out = {}
    for bb in BACKBONES:
        metrics = json.loads((project / f"metrics/backbones/{bb}.json").read_text())
        predictions = read_csv(project / f"plots/backbones/{bb}/predictions.csv")
        out[bb] = {"metrics": metrics, "predicted": list(predictions.predicted), "path": list(predictions.path),
                   "project": project}  # fmt: skip
    return out


def same_head(f32: dict, bf16: dict, bb: str) -> float:
    """The float32 run's head on the bfloat16 run's test features: the effect of the precision alone (no
    retraining), as when a model trained in float32 is served with a bfloat16 backbone pass."""
    from imgclf.core.io import read_csv, read_json
    from imgclf.features.store import FeatureStore
    from imgclf.head.model import load_model

    test = read_csv(bf16["project"] / "data/split/test.csv")
    head = load_model(str(f32["project"] / f"models/{bb}/head.keras"))
    classes = read_json(f32["project"] / f"models/{bb}/info.json")["classes"]
    probs = head.predict(FeatureStore(bf16["project"] / f"data/features/{bb}").take(test), verbose=0)
    predicted = [classes[i] for i in probs.argmax(axis=1)]
    return sum(a == b for a, b in zip(f32["predicted"], predicted, strict=True)) / len(predicted)


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (root, extra) in datasets(Path(tmp)).items():
            runs = {p: run(root, p, extra, Path(tmp)) for p in ("float32", "bfloat16")}
            rows = {}
            for bb in BACKBONES:
                f32, bf16 = runs["float32"][bb], runs["bfloat16"][bb]
                assert f32["path"] == bf16["path"]
                agree = sum(a == b for a, b in zip(f32["predicted"], bf16["predicted"], strict=True))
                low, high = f32["metrics"]["accuracy_low"], f32["metrics"]["accuracy_high"]
                rows[bb] = {
                    "test_images": len(f32["path"]),
                    "agreement": round(agree / len(f32["path"]), 4),
                    "agreement_same_head": round(same_head(f32, bf16, bb), 4),
                    "accuracy_float32": f32["metrics"]["accuracy"],
                    "ci_float32": [low, high],
                    "accuracy_bfloat16": bf16["metrics"]["accuracy"],
                    "bfloat16_within_ci": low <= bf16["metrics"]["accuracy"] <= high,
                }
                print(name, bb, rows[bb], flush=True)
            results[name] = rows
            for p in runs.values():
                shutil.rmtree(next(iter(p.values()))["project"])
    (ROOT / "bench/results-agreement.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| dataset | backbone | test images | agreement, each run its own head | agreement, the float32 head on both "
          "| accuracy float32 [95% CI] | accuracy bfloat16 |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name, rows in results.items():
        for bb, r in rows.items():
            ci = f"{r['accuracy_float32']:.3f} [{r['ci_float32'][0]:.3f}, {r['ci_float32'][1]:.3f}]"
            cells = [name, bb, str(r["test_images"]), f"{r['agreement']:.1%}", f"{r['agreement_same_head']:.1%}", ci,
                     f"{r['accuracy_bfloat16']:.3f}"]  # fmt: skip
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
