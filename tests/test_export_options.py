"""`imgclf export`'s refusals that come before any model loads or any conversion starts (no TensorFlow needed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from imgclf.core.errors import UserError
from imgclf.deploy import export
from imgclf.results.predict import soft_vote


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "models" / "vgg16").mkdir(parents=True)
    (tmp_path / "models" / "vgg16" / "model.keras").write_bytes(b"trained")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("models/vgg16/export", "is inside models, which DVC manages"),
        ("models/new", "is inside models, which DVC manages"),
        ("models", "holds this project or its models"),
        (".", "holds this project or its models"),
        ("link", "is a symbolic link"),
        ("models/vgg16/model.keras", "is a file"),
    ],
)
def test_an_out_folder_that_would_lose_or_hide_files_is_refused(project: Path, out: str, expected: str) -> None:
    (project / "elsewhere").mkdir()
    (project / "link").symlink_to(project / "elsewhere")
    with pytest.raises(UserError, match=expected):
        export.check_out_dir(out, "models", force=True)
    assert (project / "models/vgg16/model.keras").read_bytes() == b"trained"


def test_an_earlier_export_is_replaced_only_with_force(project: Path) -> None:
    earlier = project / "exports" / "vgg16"
    earlier.mkdir(parents=True)
    (earlier / export.RECORD).write_text("{}")
    with pytest.raises(UserError, match="pass --force"):
        export.check_out_dir(earlier, "models", force=False)
    assert export.check_out_dir(earlier, "models", force=True) == earlier


def test_a_missing_runtime_is_named_before_any_conversion(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def without_onnxruntime(name: str, *args: object) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    monkeypatch.setattr(export, "write_model", lambda *a, **k: pytest.fail("converted before checking the runtime"))
    monkeypatch.setattr(export, "deployable_model", lambda *a, **k: pytest.fail("built a model before the check"))
    with pytest.raises(UserError, match=r"onnxruntime is not installed.*requirements-export\.txt"):
        export.export([], "onnx", project / "exports" / "x", [project / "image.png"])
    assert not (project / "exports").exists()


@pytest.mark.parametrize(
    ("fmt", "quantize", "tolerance", "expected"),
    [
        ("keras", "none", None, "--format='keras' is not one of"),
        ("onnx", "int8", None, "applies to --format tflite only"),
        ("tflite", "int4", None, "--quantize='int4' is not one of"),
        ("savedmodel", "none", -1.0, "must be a probability difference of 0 or more"),
        ("savedmodel", "none", float("nan"), "must be a probability difference of 0 or more"),
    ],
)
def test_a_wrong_option_gets_one_line(fmt: str, quantize: str, tolerance: float | None, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        export.check_options(fmt, quantize, tolerance)


def test_the_ensemble_rounds_its_members_as_compares_csv_files_do() -> None:
    """compare averages the members' predictions.csv (8 decimals); predict must average the same numbers, or a
    temperature below 1 would magnify the difference."""
    members = [np.array([[0.123456789, 0.876543211]]), np.array([[0.5, 0.5]])]
    rounded = [np.array([[float(f"{v:.8f}") for v in m[0]]]) for m in members]
    np.testing.assert_array_equal(soft_vote(members, 0.3), soft_vote(rounded, 0.3))
