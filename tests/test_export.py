"""`imgclf export`: each format written, run by the runtime a user deploys it with, and equal to the pipeline's
calibrated test predictions; a failed check writes nothing. On the tiny trained project (tests/conftest.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run

from imgclf.core.io import read_csv
from imgclf.data.images import ImageRecipe, load_image

pytestmark = pytest.mark.slow

RUNTIMES = {"savedmodel": "tensorflow", "tflite": "ai_edge_litert", "onnx": "onnxruntime"}


def export(project: Path, *args: str, check: bool = True):
    return run([sys.executable, "-m", "imgclf", "export", *args], project, check=check)


def decoded_test_images(project: Path, record: dict) -> np.ndarray:
    """The test split as the export's input contract says: decoded by the recipe, S x S, uint8 RGB."""
    test = read_csv(project / "data/split/test.csv")
    recipe = ImageRecipe.from_params(record["image_recipe"])
    size = record["input"]["shape"][1]
    return np.stack([load_image(project / "images" / p, size, recipe) for p in test.path]).astype(np.uint8)


def run_in_runtime(fmt: str, path: Path, images: np.ndarray) -> np.ndarray:
    """The export run as a deployment would run it, without imgclf's code."""
    if fmt == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return next(iter(serve(tf.constant(images)).values())).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def calibrated_test_predictions(project: Path, name: str) -> np.ndarray:
    folder = "plots/ensemble" if name == "ensemble" else f"plots/backbones/{name}"
    predictions = read_csv(project / folder / "predictions.csv")
    return predictions[[c for c in predictions.columns if c.startswith("p_")]].to_numpy(dtype=np.float64)


# In the tiny project MobileNet computes in float32 and VGG16 in bfloat16 (helpers.TINY): the ensemble of both
# exports as a SavedModel; ONNX and TFLite take float32 models only (the last test).
@pytest.mark.parametrize(
    ("name", "fmt"),
    [("mobilenet", "savedmodel"), ("mobilenet", "tflite"), ("mobilenet", "onnx"), ("ensemble", "savedmodel")],
)
def test_an_export_runs_in_its_runtime_and_gives_the_calibrated_test_predictions(
    trained: Path, tmp_path: Path, name: str, fmt: str
) -> None:
    pytest.importorskip(
        RUNTIMES[fmt], reason=f"{RUNTIMES[fmt]} is not installed (pip install -r requirements-export.txt)"
    )
    out = tmp_path / f"{name}-{fmt}"
    result = export(trained, "--backbone", name, "--format", fmt, "--out", str(out))
    test = read_csv(trained / "data/split/test.csv")
    assert f"predicted class identical for {len(test)}/{len(test)}" in result.stdout and "PASS" in result.stdout
    record = json.loads((out / "imgclf_model.json").read_text())
    assert record["classes"] == ["hbar", "ring", "vbar"] and record["input"]["dtype"] == "uint8"
    assert record["check"]["images"] == len(test) and record["check"]["max_abs_difference"] <= 1e-4
    members = ["vgg16", "mobilenet"] if name == "ensemble" else [name]
    assert sorted(record["calibration"]["temperatures"]) == sorted(members)
    # Independently of imgclf's check: the runtime on the test images gives evaluate@'s calibrated predictions.
    got = run_in_runtime(fmt, out / record["file"], decoded_test_images(trained, record))
    want = calibrated_test_predictions(trained, name)
    assert np.array_equal(got.argmax(axis=1), want.argmax(axis=1))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_an_export_that_disagrees_beyond_its_tolerance_is_not_written(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict"  # a SavedModel differs from predict by ~1e-7 (the fastest format to write)
    result = export(
        trained, "--backbone", "mobilenet", "--format", "savedmodel", "--out", str(out), "--tolerance", "0", check=False
    )
    assert result.returncode == 1, result.stderr
    assert "FAIL" in result.stdout and f"it was not written to {out}" in result.stderr
    assert not out.exists()


def test_export_never_replaces_a_folder_that_is_not_an_earlier_export(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):  # --force replaces an earlier export only, never someone's folder
        result = export(trained, "--backbone", "mobilenet", "--format", "onnx", "--out", str(out), *force, check=False)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: --out {out}")
        assert (out / "keep.txt").read_text() == "mine"
    for project_or_models in (".", "..", "models"):
        result = export(trained, "--backbone", "mobilenet", "--format", "onnx", "--out", project_or_models, "--force",
                        check=False)  # fmt: skip
        assert result.returncode == 2 and "holds this project or its models" in result.stderr
    assert (trained / "models/mobilenet/model.keras").is_file()


def test_a_bfloat16_model_is_refused_by_onnx_with_one_line(trained: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -r requirements-export.txt)")
    out = tmp_path / "bf16"
    result = export(trained, "--backbone", "vgg16", "--format", "onnx", "--out", str(out), check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: vgg16 (bfloat16) computes in reduced precision") and "savedmodel" in last
    assert not out.exists()
