"""Load and validate params.yaml at the start of every stage.

Every message names the key, the value received and the fix. Unknown keys (a typo such as `trian:`)
are reported with the nearest valid key.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from imgclf.core.errors import UserError, log
from imgclf.data.dicom import DICOM_WINDOWS, FRAME_CHOICES
from imgclf.data.images import HIGH_BIT_DEPTH_RULES
from imgclf.features.backbones import BACKBONES, resolve_weights_path

PILLOW_HARD_LIMIT = 2 * 89_478_485  # Pillow refuses images above twice its default MAX_IMAGE_PIXELS
WEIGHTS_DIR = "weights"  # the project folder that holds weights files; features@ depends on it (dvc.yaml)
PRECISIONS = ("float32", "bfloat16", "float16")  # features.precision; what each means: features/device.py
# data.groups (imgclf/data/subjects.py; prepare checks the pattern and the table's place before it scans).
GROUP_RULES = ("none", "dicom", "pattern", "csv")
UNKEYED_RULES = ("stop", "own_group")
KEY_IN_PATH_RULES = ("stop", "allow")  # a subject's raw key inside its own file's path (subjects.check_key_in_path)

# The shape of params.yaml: a type, a tuple of allowed strings, or a nested section.
TRAIN_KEYS: dict[str, Any] = {
    "epochs": "posint",
    "batch_size": "posint",
    "lr": "posfloat",
    "token_dim": "nonnegint",
    "heads": "posint",
    "key_dim": "posint",
    "dense_units": "posint",
    "dropout": "fraction",
    "noise_stddev": "nonnegfloat",
    "early_stopping": {"monitor": ("val_loss", "val_accuracy"), "patience": "nonnegint"},
    "calibration": ("temperature", "none"),
}
SCHEMA: dict[str, Any] = {
    "base": {"seed": "nonnegint"},
    "data": {
        "root": "str",
        "min_side": "posint",
        "max_pixels": "posint",
        "background": "rgb",
        "high_bit_depth": HIGH_BIT_DEPTH_RULES,
        "window": "percentiles",
        "bits_stored": "bits",
        "jpeg_scaling": "bool",
        "use_provided_splits": "bool",
        "label_conflicts": ("skip", "majority"),
        "near_duplicates": ("group", "report", "off"),
        "near_duplicate_distance": "nonnegint",
        "near_duplicate_correlation": "fraction",
        "dicom_window": DICOM_WINDOWS,
        "dicom_frame": "frame",
        "groups": {
            "by": GROUP_RULES,
            "dicom_tag": "dicom_tag",
            "pattern": "optstr",
            "csv": "optstr",
            "unkeyed": UNKEYED_RULES,
            "key_in_path": KEY_IN_PATH_RULES,
        },
        "show_images": "auto_bool",
    },
    "eda": {"samples_per_class": "posint"},
    "split": {"val": "fraction", "test": "fraction"},
    "balance": {"method": ("none", "random_over")},
    "backbones": "backbones",
    "augment": {
        "copies": "nonnegint",
        "flip": "bool",
        "rotation": "nonnegfloat",
        "zoom": "nonnegfloat",
        "translation": "nonnegfloat",
        "brightness": "nonnegfloat",
        "contrast": "nonnegfloat",
    },
    "features": {
        "weights": "str",
        "image_size": "posint",
        "preprocessing": ("backbone", "rescale"),
        "batch_size": "posint",
        "precision": PRECISIONS,
        "precision_overrides": "precision_overrides",
        "engine": ("local", "ray"),
        "cache": "optstr",
        "ray": {"address": "str", "workers": "posint", "cpus_per_worker": "posint", "gpus_per_worker": "nonnegfloat"},
    },
    "train": {**TRAIN_KEYS, "overrides": "overrides"},
    "fine_tune": {"layers": "nonnegint", "lr": "posfloat", "epochs": "posint", "batch_size": "posint"},
    "evaluate": {
        "bootstrap": "posint",
        "confidence": "fraction",
        "attention_images_per_class": "posint",
        "calibration_bins": "posint",
        "explain_images": "posint",
        "explain_steps": "posint",
    },
    "cv": {"folds": "nonnegint", "repeats": "posint", "inner_val": "fraction"},
    "label_issues": {"show": "nonnegint", "exclude": "bool"},
}


def images_shown(data: dict[str, Any], dicom_read: bool, stage: str) -> bool:
    """data.show_images resolved for one stage: `auto` draws no image's pixels when the images are patients'
    (DICOM was read, or data.groups keys subjects); an explicit true draws them all the same, with a warning."""
    setting, patients = data["show_images"], dicom_read or data["groups"]["by"] != "none"
    why = "DICOM files are read" if dicom_read else f"data.groups.by is {data['groups']['by']}"
    if setting == "auto":
        if patients:
            log.info("%s: no image pixels in the plots (data.show_images: auto and %s)", stage, why)
        return not patients
    if setting and patients:
        log.warning(
            "%s: data.show_images is true although %s: patients' pixels go into the committed plots; set it to "
            "auto or false unless the images may be shown",
            stage, why,
        )  # fmt: skip
    return bool(setting)


def _unknown_key(prefix: str, key: Any, valid: list[str]) -> UserError:
    """`unknown key 'train.patiance' in params.yaml; did you mean 'train.patience'?`"""
    near = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {prefix + near[0]!r}?" if near else f"valid keys there: {', '.join(valid)}"
    return UserError(f"unknown key {prefix + str(key)!r} in params.yaml; {hint}")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate params.yaml; return the params with numbers normalised (1e-3 -> 0.001)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no params file at {path}; run from the project root (where params.yaml is)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a mapping of sections (base, data, ...); got {type(params).__name__}")
    return validate(params)


def validate(params: dict[str, Any]) -> dict[str, Any]:
    checked = _check_section(params, SCHEMA, "")
    _check_cross(checked)
    return checked


def _check_section(values: dict[str, Any], schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in values:
        if key not in schema:
            raise _unknown_key(prefix, key, list(schema))
    for key, rule in schema.items():
        name = f"{prefix}{key}"
        if key not in values:
            raise UserError(f"params.yaml is missing {name}; add it (see docs/params.md)")
        value = values[key]
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise UserError(f"{name} must be a section of keys ({', '.join(rule)}); got {value!r}")
            out[key] = _check_section(value, rule, f"{name}.")
        else:
            out[key] = _check_value(name, value, rule)
    return out


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise UserError(f"{name}={value!r} must be a number")
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{name}={value!r} must be a number") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise UserError(f"{name}={value!r} must be a whole number")
        return value
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{name}={value!r} must be a finite number")
    return float(value)


def _check_value(name: str, value: Any, rule: Any) -> Any:
    if isinstance(rule, tuple):
        if value not in rule:
            raise UserError(f"{name}={value!r} is not one of: {', '.join(rule)}")
        return value
    if rule == "str":
        if not isinstance(value, str) or not value:
            raise UserError(f"{name}={value!r} must be a non-empty string")
        return value
    if rule == "optstr":
        if value is not None and (not isinstance(value, str) or not value):
            raise UserError(f"{name}={value!r} must be null or a non-empty string")
        return value
    if rule == "frame":
        if value in FRAME_CHOICES or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise UserError(
            f"{name}={value!r} must be one of {', '.join(FRAME_CHOICES)} or a 0-based frame number (0, 1, ...)"
        )
    if rule == "dicom_tag":  # a known keyword is checked only with data.groups.by: dicom (_check_cross)
        if not isinstance(value, str) or not value:
            raise UserError(f"{name}={value!r} must be a DICOM attribute keyword such as PatientID")
        return value
    if rule == "auto_bool":
        if not isinstance(value, bool) and value != "auto":
            raise UserError(f"{name}={value!r} must be auto, true or false")
        return value
    if rule == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{name}={value!r} must be true or false")
        return value
    if rule in ("posint", "nonnegint"):
        number = _number(name, value, int)
        if number < (1 if rule == "posint" else 0):
            raise UserError(f"{name}={value!r} must be {'positive' if rule == 'posint' else 'zero or more'}")
        return number
    if rule in ("posfloat", "nonnegfloat", "fraction"):
        number = _number(name, value, float)
        if rule == "posfloat" and number <= 0:
            raise UserError(f"{name}={value!r} must be positive")
        if rule == "nonnegfloat" and number < 0:
            raise UserError(f"{name}={value!r} must be zero or more")
        if rule == "fraction" and not 0 < number < 1:
            raise UserError(f"{name}={value!r} must be strictly between 0 and 1")
        return number
    if rule == "bits":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 9 <= value <= 16:
            raise UserError(
                f"{name}={value!r} must be null (each image's smallest standard depth: 8, 10, 12, 14 or 16 bits) "
                "or the dataset's bits per sample, 9 to 16 (e.g. 12 for a 12-bit CT series)"
            )
        return value
    if rule == "rgb":
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value)) or not all(
            0 <= v <= 255 for v in value
        ):
            raise UserError(f"{name}={value!r} must be a list of three integers 0-255 (R, G, B)")
        return list(value)
    if rule == "percentiles":
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1] <= 100
        ):
            raise UserError(f"{name}={value!r} must be two percentiles [low, high] with 0 <= low < high <= 100")
        return [float(v) for v in value]
    if rule == "backbones":
        if not isinstance(value, list) or not value:
            raise UserError(f"{name} must be a non-empty list; known backbones: {', '.join(BACKBONES)}")
        for item in value:
            if item not in BACKBONES:
                raise UserError(f"{name} lists unknown backbone {item!r}; known backbones: {', '.join(BACKBONES)}")
        if len(set(value)) != len(value):
            raise UserError(f"{name}={value!r} lists a backbone twice")
        return list(value)
    if rule == "precision_overrides":
        value = value or {}
        if not isinstance(value, dict):
            raise UserError(f"{name} must map backbones to a precision, e.g. {{mobilenet: float32}}; got {value!r}")
        for bb, precision in value.items():
            if bb not in BACKBONES:
                raise UserError(f"{name} names unknown backbone {bb!r}; known backbones: {', '.join(BACKBONES)}")
            if precision is not None and precision not in PRECISIONS:
                raise UserError(
                    f"{name}.{bb}={precision!r} is not one of: {', '.join(PRECISIONS)} (or null: features.precision)"
                )
        return dict(value)
    if rule == "overrides":
        value = value or {}
        if not isinstance(value, dict):
            raise UserError(f"{name} must map backbone names to train keys, e.g. {{xception: {{lr: 0.0005}}}}")
        out = {}
        for bb, section in value.items():
            if bb not in BACKBONES:
                raise UserError(f"{name} names unknown backbone {bb!r}; known backbones: {', '.join(BACKBONES)}")
            section = section or {}
            if not isinstance(section, dict):
                raise UserError(f"{name}.{bb} must be a section of train keys; got {section!r}")
            out[bb] = _check_partial(f"{name}.{bb}", section, TRAIN_KEYS)
        return out
    raise AssertionError(f"unhandled rule {rule!r}")


def _check_dicom_tag(name: str, value: str) -> None:
    try:
        from pydicom.datadict import tag_for_keyword
    except ImportError:
        raise UserError(
            "data.groups.by=dicom needs pydicom; install the requirements (pip install -r requirements.txt)"
        ) from None
    if tag_for_keyword(value) is None:
        raise UserError(
            f"{name}={value!r} is not a DICOM attribute keyword; use one such as PatientID, OtherPatientIDs or "
            "StudyInstanceUID (the keyword, not the tag number)"
        )


def _check_partial(name: str, value: Any, rule: Any) -> Any:
    """An override: like the full schema, but a section may give only some of its keys."""
    if not isinstance(rule, dict):
        return _check_value(name, value, rule)
    if not isinstance(value, dict):
        raise UserError(f"{name} must be a section of keys ({', '.join(rule)}); got {value!r}")
    for key in value:
        if key not in rule:
            raise _unknown_key(f"{name}.", key, list(rule))
    return {k: _check_partial(f"{name}.{k}", v, rule[k]) for k, v in value.items()}


def _check_cross(params: dict[str, Any]) -> None:
    # train@<bb> tracks only train.overrides.<bb> (so an override reruns that backbone alone): DVC needs the key.
    missing = [bb for bb in params["backbones"] if bb not in params["train"]["overrides"]]
    if missing:
        raise UserError(
            f"train.overrides has no entry for {', '.join(missing)}; add `{missing[0]}: {{}}` under train.overrides "
            "(one entry per backbone in backbones, empty for none)"
        )
    # features@<bb> tracks only features.precision_overrides.<bb> (so an override reruns that backbone alone).
    missing = [bb for bb in params["backbones"] if bb not in params["features"]["precision_overrides"]]
    if missing:
        raise UserError(
            f"features.precision_overrides has no entry for {', '.join(missing)}; add `{missing[0]}: null` under it "
            "(one entry per backbone in backbones; null uses features.precision)"
        )
    augment = params["augment"]
    for key, limit, meaning in (
        ("rotation", 180, "degrees either way"),
        ("zoom", 0.9, "a fraction of the size"),
        ("translation", 0.5, "a fraction of the side"),
        ("brightness", 1, "a fraction of the full range"),
        ("contrast", 1, "a fraction of the contrast"),
    ):
        if augment[key] > limit:
            raise UserError(f"augment.{key}={augment[key]} is too strong: at most {limit} ({meaning}); 0 turns it off")
    split = params["split"]
    if split["val"] + split["test"] >= 1:
        raise UserError(
            f"split.val={split['val']} and split.test={split['test']} add up to "
            f"{split['val'] + split['test']:g}, leaving no training data; keep their sum below 1 (e.g. 0.15 and 0.15)"
        )
    if params["cv"]["folds"] == 1:
        raise UserError("cv.folds=1 leaves nothing to train on; use 0 (off) or 2 or more (5 is usual)")
    size = params["features"]["image_size"]
    for name in params["backbones"]:
        minimum = BACKBONES[name].min_size
        if size < minimum:
            raise UserError(
                f"features.image_size={size} is below {name}'s minimum of {minimum}; "
                f"raise it or drop {name} from backbones"
            )
    data = params["data"]
    if data["high_bit_depth"] == "bit_depth" and data["bits_stored"] is None:
        raise UserError(
            "data.high_bit_depth=bit_depth scales every image by the dataset's bit depth: set data.bits_stored to "
            "it (e.g. 12 for a 12-bit CT or MRI series; DICOM's BitsStored), or use high_bit_depth: window"
        )
    groups = data["groups"]
    if groups["by"] == "dicom":
        _check_dicom_tag("data.groups.dicom_tag", groups["dicom_tag"])
    if groups["by"] == "pattern" and groups["pattern"] is None:
        raise UserError(
            r"data.groups.by=pattern needs data.groups.pattern, a regular expression whose first group is the "
            r"subject, e.g. 'person(\d+)_'"
        )
    if groups["by"] == "csv" and groups["csv"] is None:
        raise UserError(
            "data.groups.by=csv needs data.groups.csv, a table path,group inside data.root (e.g. groups.csv)"
        )
    if data["max_pixels"] > PILLOW_HARD_LIMIT:
        raise UserError(
            f"data.max_pixels={data['max_pixels']} is above {PILLOW_HARD_LIMIT}, the most pixels Pillow decodes; "
            "lower it (images above it are skipped as decompression bombs either way)"
        )
    weights = params["features"]["weights"]
    if weights not in ("imagenet", "none"):
        for name in params["backbones"]:
            found = resolve_weights_path(weights, BACKBONES[name])
            # The file may be a symlink (DVC hashes its target), a folder on its way may not (DVC does not walk
            # into symlinked folders): the file's real folder must be inside weights/.
            inside = found is not None and Path(os.path.realpath(found.parent)).is_relative_to(
                os.path.realpath(WEIGHTS_DIR)
            )
            if found is not None and not inside:
                raise UserError(
                    f"features.weights={weights!r} points outside the project's {WEIGHTS_DIR}/ folder ({found}): "
                    f"DVC tracks {WEIGHTS_DIR}/ as a dependency of features@, so that a file replaced in place "
                    f"reruns the backbone pass. Move or symlink the file into {WEIGHTS_DIR}/ and set features.weights "
                    f"to that path (e.g. {WEIGHTS_DIR}/{{backbone}}.h5)"
                )
            if found is None:
                raise UserError(
                    f"features.weights={weights!r} is not imagenet, none, or an existing weights file for "
                    f"{name} ({Path(weights.replace('{backbone}', name)).expanduser()} not found); fix the path, "
                    "or use imagenet (Keras' download and cache) or none (random init, smoke runs only)"
                )


def train_params(params: dict[str, Any], backbone: str) -> dict[str, Any]:
    """The train section for one backbone: defaults with its `train.overrides.<backbone>` applied."""
    merged = {k: v for k, v in params["train"].items() if k != "overrides"}
    for key, value in params["train"]["overrides"].get(backbone, {}).items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    return merged
