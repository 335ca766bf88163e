"""`python -m imgclf predict`: labels new images with the trained models, survives bad files, fails clearly."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import E2E_BACKBONES, env

pytestmark = pytest.mark.slow


def predict(cwd: Path, *args: str, without_tensorflow: bool = False) -> subprocess.CompletedProcess:
    return imgclf(cwd, "predict", *args, without_tensorflow=without_tensorflow)


def imgclf(cwd: Path, *args: str, without_tensorflow: bool = False) -> subprocess.CompletedProcess:
    """`python -m imgclf ARGS`; `without_tensorflow`: with TensorFlow and Keras made unimportable, so that a
    command that imports them fails with a traceback."""
    cmd = [sys.executable, "-m", "imgclf", *args]
    if without_tensorflow:
        code = "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None; import runpy; "
        code += f"sys.argv = ['imgclf', *{list(args)!r}]; runpy.run_module('imgclf', run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env(cwd), capture_output=True, text=True)


@pytest.fixture
def folder_with_a_corrupt_file(trained: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "new images"
    folder.mkdir()
    for src in sorted((trained / "images").rglob("*.png"))[:6]:
        shutil.copy(src, folder / f"{src.parent.name}_{src.name}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    return folder


def test_folder_with_a_corrupt_file_is_classified_and_the_failure_reported(trained, folder_with_a_corrupt_file):
    result = predict(trained, "--backbone", "vgg16", str(folder_with_a_corrupt_file))
    assert result.returncode == 3, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout), keep_default_na=False)
    assert len(table) == 7
    bad = table[table.path.str.endswith("corrupt.png")].iloc[0]
    assert bad.predicted == "" and "not a decodable image" in bad.error
    good = table[table.error == ""]
    assert len(good) == 6 and set(good.predicted) <= {"hbar", "ring", "vbar"}
    probs = good[["p_hbar", "p_ring", "p_vbar"]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert "6 of 7 images classified" in result.stderr and "1 could not be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_ensemble_averages_the_backbones_and_works_from_outside_the_repo(trained, tmp_path, folder_with_a_corrupt_file):
    images = [str(p) for p in sorted(folder_with_a_corrupt_file.glob("*.png")) if p.name != "corrupt.png"]
    models = tmp_path / "models"
    shutil.copytree(trained / "models", models)
    shutil.copytree(models / "vgg16", models / "vgg19")  # a stale model left by a removed backbone
    models = str(models)
    outputs = {}
    for name in [*E2E_BACKBONES, "ensemble"]:
        out = tmp_path / f"{name}.csv"
        result = predict(tmp_path, "--backbone", name, "--models-dir", models, "--out", str(out), *images)
        assert result.returncode == 0, result.stderr
        if name == "ensemble":  # the pipeline's ensemble, not every folder found
            assert f"classified with {' + '.join(E2E_BACKBONES)}" in result.stderr
        outputs[name] = pd.read_csv(out)[["p_hbar", "p_ring", "p_vbar"]].to_numpy()
    mean = np.mean([outputs[b] for b in E2E_BACKBONES], axis=0)
    np.testing.assert_allclose(outputs["ensemble"], mean, atol=2e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backbone", "resnet50", "images"], "unknown backbone 'resnet50'; choose one of vgg16, vgg19"),
        (["--backbone", "vgg19", "images"], "no trained model in models/vgg19"),
        (["--backbone", "vgg16", "--models-dir", "nowhere", "images"], "no trained model in nowhere/vgg16"),
        (["--backbone", "vgg16", "no_such_folder"], "input 'no_such_folder' does not exist"),
        (["--backbone", "vgg16", "empty"], "no images found in empty"),
        (["--backbone", "vgg16", "--batch-size", "0", "images"], "--batch-size=0 must be a positive number"),
        (["--backbone", "ensemble", "--models-dir", "empty", "images"], "no ensemble record empty/ensemble.json"),
    ],
    ids=[
        "unknown backbone",
        "untrained backbone",
        "missing models dir",
        "missing input",
        "empty folder",
        "batch size 0",
        "no ensemble record",
    ],
)
def test_usage_errors_give_one_line_and_exit_2(trained, tmp_path, args, message):
    """Each before TensorFlow is imported (it would cost seconds): here it cannot be, so a late check fails."""
    empty = tmp_path / "empty"  # not in the shared trained project
    empty.mkdir()
    args = [str(empty) if a == "empty" else a for a in args]
    message = message.replace("empty", str(empty))
    result = predict(trained, *args, without_tensorflow=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "--backbone", "vgg19", "--out", "explained", "images/hbar"],
        ["export", "--backbone", "vgg19", "--format", "savedmodel", "--out", "exported"],  # onnx: tf2onnx needs TF
    ],
    ids=["explain", "export"],
)
def test_explain_and_export_name_a_missing_model_before_importing_tensorflow(trained, tmp_path, args):
    args = [str(tmp_path / a) if a in ("explained", "exported") else a for a in args]  # not in the shared project
    result = imgclf(trained, *args, without_tensorflow=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no trained model in models/vgg19" in result.stderr and "Traceback" not in result.stderr
