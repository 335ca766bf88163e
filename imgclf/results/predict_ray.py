"""`imgclf predict --engine ray`: classify a large folder on the Ray cluster that computes the features.

Each worker loads the trained end-to-end model (models/<bb>/model.keras: the extractor, in the precision it
was trained with, then the head) and the images it is given; an unreadable image gets an error row, as with
the local engine, and does not stop the rest. The driver holds one probability row per image (K numbers),
never images or feature maps. Each model's temperature is applied by the driver; an ensemble runs one pass per
backbone and averages, then applies its own temperature, as locally (predict.soft_vote).

Kept apart from predict.py so that evaluate@ (which uses predict.Classifier) does not depend on the Ray code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.core.logs import Progress
from imgclf.data.images import try_load_image
from imgclf.features.engine_ray import BatchModel, ray_batches
from imgclf.results.evaluation import probability_columns
from imgclf.results.predict import Classifier, check_compatible, soft_vote, table_rows


class ClassifierModel(BatchModel):
    """A Ray actor holding a trained model.keras; unreadable images become error rows, not failures."""

    def load(self, path: str) -> Any:
        from imgclf.head.model import load_model

        return load_model(path)

    def read(self, path: str) -> tuple[np.ndarray, str]:
        image, reason = try_load_image(Path(path), self.image_size, self.recipe)
        if image is None:  # a placeholder keeps the batch's shape; the row is reported as an error
            return np.zeros((self.image_size, self.image_size, 3), dtype=np.float32), reason
        return image, ""


def classify_on_ray(
    classifiers: list[Classifier],
    paths: list[Path],
    batch_size: int,
    options: dict[str, Any],
    ensemble_temperature: float = 1.0,
) -> pd.DataFrame:
    """predict.classify's table, computed by Ray workers (same columns, same error rows)."""
    from imgclf.features.engine_ray import shutdown

    classes = check_compatible(classifiers)
    members = []
    errors: dict[Path, str] = {}
    try:
        for clf in classifiers:
            probs = np.full((len(paths), len(classes)), 1.0 / len(classes))
            done = 0
            with Progress(len(paths), f"predict {clf.name} on ray") as bar:
                for out in ray_batches(
                    clf.model_file, paths, clf.image_size, batch_size, clf.recipe, options,  # type: ignore[arg-type]
                    actor=ClassifierModel, setting=options.get("setting", "--ray-address"),
                ):  # fmt: skip
                    n = len(out["row"])
                    probs[done : done + n] = clf.calibrate(np.asarray(out["output"], dtype=np.float64))
                    for i in np.flatnonzero(out["error"] != ""):
                        errors[paths[done + i]] = str(out["error"][i])
                    done += n
                    bar.update(n)
            members.append(probs)
    finally:
        shutdown()
    probs = members[0] if len(members) == 1 else soft_vote(members, ensemble_temperature)
    rows = table_rows(paths, dict(zip(paths, probs, strict=True)), errors, classes)
    return pd.DataFrame(rows, columns=["path", "predicted", *probability_columns(classes), "error"])
