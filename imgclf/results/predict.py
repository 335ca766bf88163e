"""Classify new images with trained models, with exactly the preprocessing used in training.

A `Classifier` is one trained backbone (models/<bb>/model.keras): the same extractor that made the
training features, then the head, then the temperature train@ fitted (info.json; results/calibration.py).
Images go through the shared `load_image` in batches, so memory stays flat for large folders; a file that
cannot be read gets an error row and does not stop the rest. The ensemble averages its members' calibrated
probabilities, then applies its own temperature (compare's record, models/ensemble.json).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgclf.core.errors import UserError
from imgclf.core.io import read_json
from imgclf.core.logs import Progress
from imgclf.data.images import DEFAULT_RECIPE, IMAGE_EXTENSIONS, ImageRecipe, is_image_file, load_image, try_load_image
from imgclf.results.calibration import apply_temperature
from imgclf.results.evaluation import format_probability, probability_columns

MODEL_FILE = "model.keras"
ENSEMBLE_FILE = "ensemble.json"  # written by compare: the backbones of the pipeline's ensemble


def ensemble_record(models_dir: str | Path) -> dict[str, Any]:
    """compare's record of the pipeline's ensemble: its backbones (never whatever folders exist), classes and
    temperature."""
    record = Path(models_dir) / ENSEMBLE_FILE
    if not record.is_file():
        raise UserError(
            f"no ensemble record {record}; run `dvc repro` (compare writes it), or pass --models-dir pointing at "
            "the folder that holds it"
        )
    return read_json(record)


def chosen_models(backbone: str, models_dir: Path) -> tuple[list[str], float]:
    """--backbone's models and the temperature applied after their average: one backbone (no ensemble
    temperature), or the ensemble compare recorded (its backbones and temperature), never whatever folders exist."""
    from imgclf.features.backbones import BACKBONES

    if backbone == "ensemble":
        record = ensemble_record(models_dir)
        return list(record["backbones"]), float(record.get("temperature", 1.0))
    if backbone in BACKBONES:
        return [backbone], 1.0
    raise UserError(
        f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}, or ensemble (all trained ones)"
    )


def soft_vote(calibrated: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """The ensemble's probabilities: the members' calibrated probabilities (each renormalised) averaged, then
    the ensemble's own temperature, as compare computes them from the members' predictions.csv: the members are
    rounded to the 8 decimals those files hold first, so that a temperature cannot magnify the difference."""
    rows = [np.round(np.asarray(p, dtype=np.float64), 8) for p in calibrated]
    mean = np.mean([p / p.sum(axis=1, keepdims=True) for p in rows], axis=0)
    return apply_temperature(mean / mean.sum(axis=1, keepdims=True), temperature)


def check_model_dir(model_dir: str | Path) -> Path:
    """The folder of one trained backbone, or one UserError if it lacks model.keras or info.json: the commands
    call it before they import TensorFlow, so that a wrong folder is answered in a fraction of a second."""
    model_dir = Path(model_dir)
    if not (model_dir / MODEL_FILE).is_file() or not (model_dir / "info.json").is_file():
        raise UserError(
            f"no trained model in {model_dir} (expected {MODEL_FILE} and info.json); "
            "run `dvc repro` first, or pass --models-dir pointing at the folder that holds <backbone>/model.keras"
        )
    return model_dir


@dataclass
class Classifier:
    name: str
    extractor: Any
    head: Any
    info: dict[str, Any]
    model_file: Path | None = None  # the saved end-to-end model it was loaded from

    @classmethod
    def load(cls, model_dir: str | Path) -> Classifier:
        from imgclf.head.model import load_model

        model_dir = check_model_dir(model_dir)
        full = load_model(str(model_dir / MODEL_FILE))
        info = read_json(model_dir / "info.json")
        extractor, head = full.get_layer(f"{info['backbone']}_extractor"), full.get_layer("head")
        return cls(info["backbone"], extractor, head, info, model_dir / MODEL_FILE)

    @property
    def recipe(self) -> ImageRecipe:
        """How training decoded images (background, pixel limit, high-bit-depth rule), from info.json."""
        recorded = self.info.get("image_recipe")
        return ImageRecipe.from_params(recorded) if recorded else DEFAULT_RECIPE

    @property
    def temperature(self) -> float:
        """The temperature train@ fitted on the validation split (1.0: not calibrated, or trained before)."""
        return float((self.info.get("calibration") or {}).get("temperature", 1.0))

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    def features(self, paths: list[Path], batch_size: int = 32) -> np.ndarray:
        """Feature maps (N, h, w, C) of readable images, computed as features@<bb> computes them."""
        from imgclf.features.backbone_pass import iter_features

        parts = iter_features(self.extractor, paths, self.image_size, batch_size, self.recipe, desc=self.name)
        return np.concatenate(list(parts))

    def predict_features(self, features: np.ndarray, *, calibrated: bool) -> np.ndarray:
        """Class probabilities (N, K) float64 of feature maps; `calibrated`: with the model's temperature."""
        probs = self.head.predict(features, batch_size=256, verbose=0)
        return self.calibrate(probs) if calibrated else np.asarray(probs, dtype=np.float64)

    def predict_images(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (B, K) of one batch of decoded images (B, S, S, 3) float32 0..255."""
        features = np.asarray(self.extractor.predict_on_batch(batch), dtype=np.float32)
        return self.calibrate(self.head.predict_on_batch(features))

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """The head's probabilities with this model's temperature applied (float64)."""
        return apply_temperature(np.asarray(probs, dtype=np.float64), self.temperature)


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively: image extensions and DICOM content, hidden files left out) into a
    sorted list."""
    inputs = list(inputs)
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and is_image_file(p)
            )
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"input {str(path)!r} does not exist; give image files or folders of images")
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(
            f"no images found in {', '.join(map(str, inputs))} (looked for {extensions} and DICOM files by content)"
        )
    return found


def check_compatible(classifiers: list[Classifier]) -> list[str]:
    """The classes shared by every classifier of an ensemble (and the same image recipe), or a UserError."""
    classes = classifiers[0].classes
    for c in classifiers[1:]:
        if c.classes != classes:
            raise UserError(
                f"{classifiers[0].name} and {c.name} were trained on different classes ({classes} vs {c.classes}); "
                "an ensemble needs models trained together: rerun `dvc repro`"
            )
        if c.recipe != classifiers[0].recipe:
            raise UserError(
                f"{classifiers[0].name} and {c.name} decode images differently ({classifiers[0].recipe} vs "
                f"{c.recipe}); an ensemble needs models trained together: rerun `dvc repro`"
            )
    return classes


def table_rows(paths: list[Path], probs: dict[Path, np.ndarray], errors: dict[Path, str], classes: list[str]) -> list:
    """One CSV row per path: the predicted class and probabilities, or the error that kept it from a label."""
    columns = probability_columns(classes)
    rows = []
    for p in paths:
        row: dict[str, Any] = {"path": str(p)}
        if p in errors:
            row.update({"predicted": "", **dict.fromkeys(columns, ""), "error": errors[p]})
        else:
            row.update(
                {
                    "predicted": classes[int(probs[p].argmax())],
                    **{c: format_probability(v) for c, v in zip(columns, probs[p], strict=True)},
                    "error": "",
                }
            )
        rows.append(row)
    return rows


def classify(
    classifiers: list[Classifier], paths: list[Path], batch_size: int = 32, ensemble_temperature: float = 1.0
) -> pd.DataFrame:
    """CSV-ready predictions: path, predicted, one probability per class, error. With several classifiers,
    their calibrated probabilities are averaged (soft voting), then `ensemble_temperature` is applied. Each image
    is decoded once per batch (per input size, which the classifiers of one pipeline share) and every classifier
    runs on that batch: memory stays one batch, and a file that cannot be read (or stops being readable) becomes
    an error row, never a stop."""
    if batch_size < 1:
        raise UserError(f"--batch-size={batch_size} must be a positive number of images per forward pass")
    classes = check_compatible(classifiers)
    recipe = classifiers[0].recipe
    sizes = sorted({c.image_size for c in classifiers})
    probs: dict[Path, np.ndarray] = {}
    errors: dict[Path, str] = {}
    with Progress(len(paths), "predict") as bar:
        for start in range(0, len(paths), batch_size):
            part = paths[start : start + batch_size]
            members = {c.name: np.full((len(part), len(classes)), 1.0 / len(classes)) for c in classifiers}
            for size in sizes:
                loaded = [try_load_image(p, size, recipe) for p in part]
                errors.update({p: reason for p, (_, reason) in zip(part, loaded, strict=True) if reason})
                good = [i for i, p in enumerate(part) if p not in errors]
                if good:
                    batch = np.stack([loaded[i][0] for i in good])  # (B, S, S, 3)
                    for clf in (c for c in classifiers if c.image_size == size):
                        members[clf.name][good] = clf.predict_images(batch)
            vote = list(members.values())
            total = vote[0] if len(vote) == 1 else soft_vote(vote, ensemble_temperature)
            probs.update({p: total[i] for i, p in enumerate(part) if p not in errors})
            bar.update(len(part))
    rows = table_rows(paths, probs, errors, classes)
    return pd.DataFrame(rows, columns=["path", "predicted", *probability_columns(classes), "error"])


__all__ = ["Classifier", "classify", "find_images", "load_image"]
