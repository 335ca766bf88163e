"""Export a trained backbone, or the ensemble, as one model a runtime runs without this project; check it there.

    python -m imgclf export --backbone vgg16 --format onnx --out exports/vgg16-onnx

The exported model (`deployable_model`):

    image (B, S, S, 3) uint8 RGB --cast--> preprocessing --> backbone --> head --> temperature --> (B, K)

takes a batch of images already decoded and resized to the model's side S (the recipe in the JSON beside it:
`imgclf.data.images.load_image`, i.e. EXIF orientation applied, transparency composited on the background,
high-bit-depth images windowed, then squashed to S x S, bilinear) and returns calibrated class probabilities in
the JSON's class order. An ensemble exports as one model: its members' calibrated probabilities averaged, then
its own temperature, as `imgclf predict --backbone ensemble` computes them.

Every export is run by the runtime a user deploys it with (TensorFlow for SavedModel, LiteRT for TFLite,
ONNX Runtime for ONNX) on check images (by default the test split), and compared with `imgclf predict` on the
same files: the predicted class must be the same for every image and the largest absolute probability
difference within a tolerance. An export that fails its check is not written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.errors import UserError, log
from imgclf.core.io import atomic_path, sha256_file, write_json
from imgclf.data.images import try_load_image
from imgclf.results.calibration import LOG_FLOOR
from imgclf.results.evaluation import probability_columns
from imgclf.results.predict import Classifier, check_compatible, classify

FORMATS = {"savedmodel": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}
QUANTIZATIONS = ("none", "float16", "int8")  # TFLite only: float16 weights, or dynamic-range int8 weights
# Largest absolute probability difference from `imgclf predict` that passes the check, per quantisation.
# Measured on the sample's models (docs/deploy.md): float32 exports 1.2e-7..1.8e-5; float16 and int8
# weights moved probabilities by up to 7e-3 (VGG16) and 0.2, so those checks fail there (say so with --tolerance).
TOLERANCES = {"none": 1e-4, "float16": 1e-2, "int8": 0.1}
# Opset 17: the first with LayerNormalization as one ONNX operator (the head's attention block uses it), and
# supported by every ONNX Runtime since 1.14 (2023); tf2onnx 1.17 converts to it.
ONNX_OPSET = 17
RECORD = "imgclf_model.json"
INPUT_NAME = "image"
BATCH = 16  # images per runtime call during the check


@dataclass
class Check:
    """The export's agreement with `imgclf predict` on the check images."""

    images: int
    argmax_identical: int
    max_abs_difference: float
    tolerance: float
    skipped: int  # check images that could not be read (predict's error rows)

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.argmax_identical == self.images and self.max_abs_difference <= self.tolerance

    def line(self, runtime: str) -> str:
        return (
            f"{runtime} vs imgclf predict on {self.images} images: predicted class identical for "
            f"{self.argmax_identical}/{self.images}, max |probability difference| {self.max_abs_difference:.2e} "
            f"(tolerance {self.tolerance:g}): {'PASS' if self.passed else 'FAIL'}"
        )


def temperature_layer(temperature: float, name: str) -> Any:
    """softmax(log(max(p, LOG_FLOOR)) / T) as a Keras layer: calibration.apply_temperature inside the graph."""
    import keras

    t = float(temperature)
    return keras.layers.Lambda(
        lambda p: keras.ops.softmax(keras.ops.log(keras.ops.maximum(p, LOG_FLOOR)) / t, axis=-1),
        name=name,
    )


def deployable_model(classifiers: list[Classifier], ensemble_temperature: float = 1.0) -> Any:
    """uint8 images (B, S, S, 3) -> calibrated probabilities (B, K) float32, for one backbone or an ensemble."""
    import keras

    check_compatible(classifiers)
    sizes = {c.image_size for c in classifiers}
    if len(sizes) > 1:
        raise UserError(
            f"the ensemble's backbones take different image sizes ({sorted(sizes)}); one exported model takes one "
            "input size: export the backbones one by one"
        )
    size = sizes.pop()
    image = keras.Input((size, size, 3), dtype="uint8", name=INPUT_NAME)
    pixels = keras.layers.Lambda(lambda x: keras.ops.cast(x, "float32"), name="to_float32")(image)
    members = []
    for clf in classifiers:
        # Each member in a model of its own: every trained head is a layer named "head", and names must be unique.
        inputs = keras.Input((size, size, 3), name=f"{clf.name}_pixels")
        member = keras.Model(inputs, clf.head(clf.extractor(inputs)), name=f"{clf.name}_member")
        probs = member(pixels)
        if clf.temperature != 1.0:
            probs = temperature_layer(clf.temperature, f"{clf.name}_temperature")(probs)
        members.append(probs)
    probs = members[0]
    if len(members) > 1:
        probs = keras.layers.Average(name="soft_vote")(members)
        if ensemble_temperature != 1.0:
            probs = temperature_layer(ensemble_temperature, "ensemble_temperature")(probs)
    probs = keras.layers.Activation("linear", dtype="float32", name="probabilities")(probs)
    name = classifiers[0].name if len(classifiers) == 1 else "ensemble"
    model = keras.Model(image, probs, name=f"{name}_deployable")
    model.predict_on_batch(np.zeros((1, size, size, 3), dtype=np.uint8))  # Keras' ONNX export wants a called model
    return model


def write_model(model: Any, fmt: str, path: Path, quantization: str = "none") -> None:
    """Write `model` in `fmt` at `path` (a folder for savedmodel, a file otherwise)."""
    if fmt == "savedmodel":
        model.export(str(path), format="tf_saved_model", verbose=False)
    elif fmt == "onnx":
        model.export(str(path), format="onnx", verbose=False, opset_version=ONNX_OPSET)
    else:
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if quantization != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # weights only: no representative data needed
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        path.write_bytes(converter.convert())


def runtime_of(fmt: str, path: Path) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """(the runtime's name and version, a function uint8 batch -> probabilities) for an exported model, loaded
    the way a user deploying it would."""
    if fmt == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
        return f"TensorFlow {tf.__version__} (tf.saved_model.load, serving_default)", lambda batch: next(
            iter(serve(tf.constant(batch)).values())
        ).numpy()
    if fmt == "onnx":
        ort = import_runtime("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return f"ONNX Runtime {ort.__version__} (CPUExecutionProvider)", lambda batch: session.run(None, {name: batch})[
            0
        ]
    litert = import_runtime("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_path=str(path))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(batch: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(inp["index"], list(batch.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()

    from importlib.metadata import version

    return f"LiteRT {version('ai-edge-litert')} (ai_edge_litert.interpreter)", run


def import_runtime(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"the runtime {module} is not installed; `pip install -r requirements-export.txt` (pinned converters and "
            "runtimes), then export again"
        ) from None


def uint8_batches(paths: list[Path], size: int, recipe: Any) -> Iterator[tuple[list[Path], np.ndarray]]:
    """The readable check images as the exported model's input: decoded as predict decodes them, uint8."""
    for start in range(0, len(paths), BATCH):
        loaded = [(p, try_load_image(p, size, recipe)[0]) for p in paths[start : start + BATCH]]
        good = [(p, image) for p, image in loaded if image is not None]
        if good:
            # load_image's float32 pixels are whole numbers 0..255 (a resized 8-bit image): the cast is exact.
            yield [p for p, _ in good], np.stack([image for _, image in good]).astype(np.uint8)


def check_export(
    run: Callable[[np.ndarray], np.ndarray],
    classifiers: list[Classifier],
    paths: list[Path],
    ensemble_temperature: float,
    tolerance: float,
) -> Check:
    """Run the export on `paths` and compare with `imgclf predict`'s table for the same files."""
    reference = classify(classifiers, paths, BATCH, ensemble_temperature)
    readable = reference[reference.error == ""]
    expected = {Path(p): row for p, row in zip(readable.path, readable[probability_columns(classifiers[0].classes)]
                                               .astype(float).to_numpy(), strict=True)}  # fmt: skip
    identical, worst, n = 0, 0.0, 0
    for batch_paths, batch in uint8_batches(list(expected), classifiers[0].image_size, classifiers[0].recipe):
        got = np.asarray(run(batch), dtype=np.float64)
        want = np.stack([expected[p] for p in batch_paths])
        identical += int((got.argmax(axis=1) == want.argmax(axis=1)).sum())
        worst = max(worst, float(np.abs(got - want).max()))
        n += len(batch_paths)
    return Check(n, identical, worst, tolerance, skipped=len(reference) - len(readable))


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


NEEDS = {"savedmodel": [], "tflite": ["ai_edge_litert.interpreter"], "onnx": ["tf2onnx", "onnxruntime"]}


def check_options(fmt: str, quantization: str, tolerance: float | None) -> float:
    """One line for a wrong option, before any model is loaded; returns the tolerance to use."""
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}")
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantize={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and fmt != "tflite":
        raise UserError(f"--quantize={quantization} applies to --format tflite only (got --format {fmt})")
    if tolerance is not None and not (tolerance >= 0 and np.isfinite(tolerance)):
        raise UserError(f"--tolerance={tolerance} must be a probability difference of 0 or more")
    for module in NEEDS[fmt]:  # before a conversion that can take minutes
        import_runtime(module)
    return TOLERANCES[quantization] if tolerance is None else tolerance


def check_out_dir(out_dir: str | Path, models_dir: str | Path, force: bool) -> Path:
    """The folder an export may be written to. Never one that holds anything but a previous export: --force
    replaces an empty folder or an earlier export (with its RECORD), nothing else (not the project, not the
    models, not a parent of the working directory). Not inside the models folder either (a DVC output: DVC would
    see it modified, and `dvc checkout` would delete the export), and not a symbolic link (it is replaced)."""
    out = Path(out_dir)
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; give a plain folder path (the export replaces the folder)")
    resolved = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the export (it holds the model and {RECORD})")
    here, models = Path.cwd().resolve(), Path(models_dir).resolve()
    if resolved in (here, models) or resolved in here.parents or resolved in models.parents:
        raise UserError(f"--out {out} holds this project or its models; give a new folder, e.g. exports/<name>")
    if models in resolved.parents:
        raise UserError(f"--out {out} is inside {models_dir}, which DVC manages; give a folder outside it (exports/)")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--out {out} exists and is not empty; choose a new folder, or pass --force to replace it")
        if not (out / RECORD).is_file():
            raise UserError(f"--out {out} is not an earlier export (no {RECORD}); --force replaces only those")
    return out


def export(
    classifiers: list[Classifier],
    fmt: str,
    out_dir: str | Path,
    check_paths: list[Path],
    ensemble_temperature: float = 1.0,
    quantization: str = "none",
    tolerance: float | None = None,
    force: bool = False,
    models_dir: str | Path = "models",
) -> dict[str, Any]:
    """Export, check, and (only when the check passes) write `out_dir`: the model and RECORD beside it.
    Returns the record; raises ExportCheckFailed (nothing written) when the check fails."""
    tolerance = check_options(fmt, quantization, tolerance)
    out_dir = check_out_dir(out_dir, models_dir, force)
    if not check_paths:
        raise UserError("no check images: give --check-images (files or folders), or run `dvc repro` for a test split")
    precisions = {c.name: c.info.get("precision", "float32") for c in classifiers}
    reduced = [f"{name} ({precision})" for name, precision in precisions.items() if precision != "float32"]
    if reduced and fmt != "savedmodel":
        # Measured: ONNX Runtime rejects the graph (no bfloat16 Conv on CPU: INVALID_GRAPH), the TFLite converter
        # cannot write a bfloat16 Conv2D. A float32 copy would run, but it is not the model that was evaluated.
        raise UserError(
            f"{', '.join(reduced)} computes in reduced precision, which {fmt} cannot run on CPU (ONNX Runtime has "
            "no bfloat16 convolution, TFLite no bfloat16 graph); export --format savedmodel (TensorFlow runs it), "
            "or set that backbone's features.precision to float32 and rerun `dvc repro`"
        )
    name = classifiers[0].name if len(classifiers) == 1 else "ensemble"
    model = deployable_model(classifiers, ensemble_temperature)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        target = tmp / FORMATS[fmt]
        start = time.perf_counter()
        try:
            write_model(model, fmt, target, quantization)
        except Exception as exc:  # a converter's failure, in one line: the layer it could not handle is in it
            message = " ".join(str(exc).split())[:400]
            raise ExportCheckFailed(
                f"converting {name} to {fmt} failed ({type(exc).__name__}: {message}); nothing was written to {out_dir}"
            ) from None
        seconds = time.perf_counter() - start
        try:
            runtime, run = runtime_of(fmt, target)
            check = check_export(run, classifiers, check_paths, ensemble_temperature, tolerance)
        except UserError:
            raise
        except Exception as exc:  # the runtime cannot load or run what the converter wrote: the export fails
            message = " ".join(str(exc).split())[:400]
            raise ExportCheckFailed(
                f"the {fmt} runtime cannot run the export of {name} ({type(exc).__name__}: {message}); it was not "
                f"written to {out_dir}"
            ) from None
        if check.images == 0:
            raise UserError(
                f"none of the {len(check_paths)} check images could be read (see predict's error column); "
                "give readable ones with --check-images"
            )
        print(f"export {name} -> {fmt}{'' if quantization == 'none' else f' ({quantization})'}: {check.line(runtime)}")
        if check.skipped:
            log.warning("export: %d check images could not be read and were left out", check.skipped)
        if not check.passed:
            raise ExportCheckFailed(
                f"the {fmt} export of {name} does not reproduce imgclf predict ({check.line(runtime)}); it was not "
                f"written to {out_dir}"
            )
        record = export_record(classifiers, name, fmt, quantization, target, ensemble_temperature, check, runtime)
        write_json(tmp / RECORD, record)
    log.info("export: %s written to %s (%.1f MB, converted in %.1f s)", fmt, out_dir, record["size_bytes"] / 1e6,
             seconds)  # fmt: skip
    return record


class ExportCheckFailed(UserError):
    """The export failed, and nothing was written: the converter could not convert the model, its runtime cannot
    run the result, or the result disagrees with predict beyond the tolerance (exit 1, like verify's 'beyond')."""


def export_record(
    classifiers: list[Classifier],
    name: str,
    fmt: str,
    quantization: str,
    target: Path,
    ensemble_temperature: float,
    check: Check,
    runtime: str,
) -> dict[str, Any]:
    """What a deployment needs beside the model: the input contract, classes, image recipe, calibration, and the
    check it passed. No timing and no date; the versions, the runtime and the measured difference depend on the
    machine and installation that exported it."""
    from importlib.metadata import PackageNotFoundError, version

    first = classifiers[0]
    size = first.image_size

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {
        "model": name,
        "backbones": [c.name for c in classifiers],
        "format": fmt,
        "file": target.name,
        "quantization": quantization,
        "size_bytes": size_of(target),
        "classes": first.classes,
        # Which trained models these are: the exported graph is made from exactly these files.
        "model_files_sha256": {c.name: sha256_file(c.model_file) for c in classifiers if c.model_file},
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": [None, size, size, 3],
            "layout": "NHWC, RGB, 0..255",
            "how": "decode and resize as image_recipe says (imgclf.data.images.load_image: with jpeg_scaling, a "
            "JPEG at least twice the size decoded at reduced scale (Pillow's draft); EXIF orientation, transparency "
            "onto background, high bit depth windowed, squashed to size x size, bilinear)",
        },
        "output": {"shape": [None, len(first.classes)], "meaning": "calibrated class probabilities, in classes order"},
        "image_size": size,
        "preprocessing": first.info.get("preprocessing"),
        "image_recipe": first.recipe.to_dict(),
        "calibration": {
            "temperatures": {c.name: c.temperature for c in classifiers},
            "ensemble_temperature": ensemble_temperature if len(classifiers) > 1 else None,
        },
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "check": {
            "runtime": runtime,
            "against": "imgclf predict (Keras) on the same files",
            "images": check.images,
            "argmax_identical": check.argmax_identical,
            "max_abs_difference": float(f"{check.max_abs_difference:.3g}"),
            "tolerance": check.tolerance,
        },
        "versions": {
            p: installed(p) for p in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert")
        },
    }


def check_images_of(split_csv: Path, root: Path) -> list[Path]:
    """The test split's files (data/split/test.csv, under data.root), or [] when there is none."""
    from imgclf.core.io import read_csv

    if not split_csv.is_file():
        return []
    return [root / p for p in read_csv(split_csv).path]
