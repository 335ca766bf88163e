"""How far Grad-CAM and the attention map point at what decides the class, with controls (issue 36).

    python bench/explain_controls.py

The setup of tests/test_explain.py (shapes in a random quadrant, a head trained on a small random-init
convolutional extractor; 320 training and 80 test images, seed 3), twice: as in the test, and with a bright
checkerboard patch that says nothing of the class in another quadrant. For each map: the share of test images
whose peak lies in the shape's quadrant (the pointing game), next to controls that do not depend on the trained
model (the same map from a fully randomised head, the feature map's summed activation, another class's
Grad-CAM); and the deletion and insertion areas on 24 images against a random order, with a randomised head's
maps as a control. Writes bench/results-explain-controls.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from machine import cpu_model  # noqa: E402


def with_checkerboard(images: np.ndarray, where: np.ndarray, seed: int) -> np.ndarray:
    import test_explain as t

    half = t.SIZE // 2
    rng = np.random.default_rng(seed + 99)
    checker = np.kron((np.indices((4, 4)).sum(axis=0) % 2) * 220.0, np.ones((6, 6)))
    out = images.copy()
    for i in range(len(images)):
        other = (where[i] + rng.integers(1, 4)) % 4  # another quadrant than the shape's
        y, x = (other // 2) * half + half // 2 - 12, (other % 2) * half + half // 2 - 12
        out[i, y : y + 24, x : x + 24, :] = checker[..., None]
    return out


def measure(distractor: bool) -> dict[str, Any]:
    import keras
    import test_explain as t

    from imgclf.results import explain

    setup = t.train_on_shapes((lambda images, where: with_checkerboard(images, where, seed=0)) if distractor else None)
    extractor, head, images, f, w = (setup[k] for k in ("extractor", "head", "images", "features", "where"))
    predicted = setup["predicted"]
    random_head = explain.randomized(head, list(explain.CASCADE), 0)
    pointing = {
        "gradcam": t.peak_in_region(explain.grad_cam(head, f, predicted), w),
        "gradcam_randomised_head": t.peak_in_region(explain.grad_cam(random_head, f, predicted), w),
        "gradcam_another_class": t.peak_in_region(explain.grad_cam(head, f, (predicted + 1) % 4), w),
        "attention": t.peak_in_region(explain.attention_maps(head, f), w),
        "attention_randomised_head": t.peak_in_region(explain.attention_maps(random_head, f), w),
        "summed_activation": t.peak_in_region(f.sum(axis=-1), w),
    }
    classifier = keras.Sequential([extractor, head])

    def predict(batch: np.ndarray) -> np.ndarray:
        return classifier.predict(batch, batch_size=64, verbose=0).astype(np.float64)

    n = 24
    maps = explain.explain_maps(head, f[:n], predicted[:n], 1.0)
    controls = explain.explain_maps(random_head, f[:n], predicted[:n], 1.0)
    maps |= {f"{name}_randomised_head": m for name, m in controls.items()}
    scores = explain.deletion_insertion(predict, images[:n], maps, predicted[:n], steps=10)
    areas = {
        name: {k: v["auc"] for k, v in value.items()} for name, value in scores.items() if name in [*maps, "random"]
    }
    return {
        "accuracy": setup["accuracy"],
        "pointing": pointing,
        "areas": areas,
        "sanity": explain.sanity_check(head, f[:n], predicted[:n], 1.0)["gradcam"],
    }


def main() -> None:
    report = {"machine": cpu_model(), "plain": measure(False), "checkerboard": measure(True)}
    (ROOT / "bench/results-explain-controls.json").write_text(json.dumps(report, indent=1) + "\n")
    for setting in ("plain", "checkerboard"):
        print(setting, json.dumps(report[setting]["pointing"]), json.dumps(report[setting]["areas"]))


if __name__ == "__main__":
    main()
