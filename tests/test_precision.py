"""features.precision: the backbone pass in bfloat16 (or float16 on a GPU) decides like float32, and every
stage that runs the backbone again (fine-tuning, evaluate, predict) runs it in the precision it was built in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import ROOT

from imgclf.core.errors import UserError

SAMPLE = ROOT / "data/sample"


def sample_split(per_class: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The first `per_class` images of every class of the bundled sample, and a 2:1 train/test mask."""
    paths, labels = [], []
    for label, folder in enumerate(sorted(p for p in SAMPLE.iterdir() if p.is_dir())):
        for path in sorted(folder.glob("*.png"))[:per_class]:
            paths.append(path)
            labels.append(label)
    is_train = np.arange(len(paths)) % 3 != 0
    return paths, np.array(labels), is_train


def extractor_in(precision: str, backbone: str = "vgg16", size: int = 64):
    """The extractor features@ builds, with the same seed (so the same random weights) in every precision."""
    from imgclf.core.repro import seed_everything
    from imgclf.features.backbones import build_backbone, get_backbone
    from imgclf.features.device import dtype_policy
    from imgclf.features.extractor import build_extractor

    seed_everything(0)
    with dtype_policy(precision):
        model, _ = build_backbone(get_backbone(backbone), size, "none")
    return build_extractor(model, backbone, size, "backbone")


def test_bfloat16_features_make_the_same_decisions_as_float32() -> None:
    """The head trained on float32 features labels the test images the same from bfloat16 features (>= 97%),
    and the bfloat16 pass really ran in bfloat16 (its features differ from float32's, slightly)."""
    from imgclf.features.backbone_pass import iter_features
    from imgclf.features.device import model_precision
    from imgclf.features.store import FeatureBatches
    from imgclf.head.model import build_attention_head
    from imgclf.head.training import fit_head

    paths, labels, is_train = sample_split(per_class=45)
    features = {}
    for precision in ("float32", "bfloat16"):
        extractor = extractor_in(precision)
        assert model_precision(extractor) == precision
        # The feature map leaves the extractor as float32 (its last layer casts), whatever the compute precision.
        assert extractor.output.dtype == "float32"
        assert extractor.predict_on_batch(np.zeros((1, 64, 64, 3), dtype=np.float32)).dtype == np.float32
        features[precision] = np.concatenate(list(iter_features(extractor, paths, 64, 32, desc=precision)))
    f32, bf16 = features["float32"], features["bfloat16"]
    relative = np.abs(bf16 - f32).max() / np.abs(f32).max()
    assert 0 < relative < 0.05, relative  # bfloat16 keeps 8 significant bits: different, but close

    train, test = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    head = build_attention_head(
        f32.shape[1:], 4, feature_mean=f32[train].mean((0, 1, 2)), feature_variance=f32[train].var((0, 1, 2))
    )
    params = {"lr": 3e-4, "epochs": 25, "early_stopping": {"monitor": "val_loss", "patience": 5}}
    fit_head(
        head,
        FeatureBatches([(f32, train, labels[train])], 32, shuffle_seed=0),
        FeatureBatches([(f32, test, labels[test])], 32),
        params,
    )
    predicted = {p: head.predict(x[test], verbose=0).argmax(axis=1) for p, x in features.items()}
    assert (predicted["float32"] == labels[test]).mean() >= 0.7  # the head learned something to agree on
    agreement = (predicted["float32"] == predicted["bfloat16"]).mean()
    assert agreement >= 0.97, f"bfloat16 agrees with float32 on {agreement:.1%} of {len(test)} test images"


def test_a_saved_model_runs_its_backbone_in_the_precision_it_was_built_in(tmp_path: Path) -> None:
    """extractor.keras and model.keras keep each layer's dtype policy: predict (Classifier) recomputes exactly
    the features features@ cached, with no precision param of its own."""
    import json

    from imgclf.core.io import save_keras
    from imgclf.features.device import model_precision
    from imgclf.features.reuse import compute_features
    from imgclf.features.store import FeatureStore
    from imgclf.head.model import build_attention_head, build_end_to_end
    from imgclf.results.predict import Classifier

    paths, _, _ = sample_split(per_class=4)
    images = pd.DataFrame({"sha256": [f"{i:064x}" for i in range(len(paths))], "path": [str(p) for p in paths]})
    extractor = extractor_in("bfloat16", "mobilenet", 32)
    info = {"backbone": "mobilenet", "image_size": 32, "precision": "bfloat16"}
    compute_features(extractor, images, "/", tmp_path / "features", 32, 8, info)
    store = FeatureStore(tmp_path / "features")
    cached = store.take(images)
    assert np.abs(cached).max() > 0  # MobileNet's ~1e-20 activations survive bfloat16 (float32's exponent range)

    head = build_attention_head(store.feature_shape, 4, token_dim=8, heads=1, key_dim=4, dense_units=8)
    model_dir = tmp_path / "models/mobilenet"
    model_dir.mkdir(parents=True)
    save_keras(build_end_to_end(store.extractor(), head, "mobilenet_classifier"), model_dir / "model.keras")
    (model_dir / "info.json").write_text(json.dumps({"backbone": "mobilenet", "classes": list("abcd"), **info}))
    classifier = Classifier.load(model_dir)
    assert model_precision(classifier.extractor) == "bfloat16"
    np.testing.assert_array_equal(classifier.features(paths, batch_size=8), cached)


def test_float16_without_a_gpu_stops_with_the_alternatives() -> None:
    from imgclf.features.device import check_precision

    with pytest.raises(UserError) as error:
        check_precision("float16", "vgg16", gpus=[])
    message = str(error.value)
    assert "float16" in message and "no GPU" in message and "bfloat16" in message and "float32" in message
    check_precision("float16", "vgg16", gpus=["GPU:0"])  # on a GPU it is what float16 is for


def test_bfloat16_on_a_cpu_without_bfloat16_units_warns(monkeypatch, caplog) -> None:
    import imgclf.features.device as device

    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})
    device.check_precision("bfloat16", "xception", gpus=[])
    assert "no bfloat16 units" in caplog.text and "xception" in caplog.text
    caplog.clear()
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    device.check_precision("bfloat16", "xception", gpus=[])
    assert caplog.text == ""


def test_features_that_underflow_or_overflow_stop_before_anything_is_written(tmp_path: Path) -> None:
    from imgclf.features.backbone_pass import check_values
    from imgclf.features.reuse import compute_features

    class Underflowing:  # an extractor whose activations all flush to zero (random-init MobileNet in float16)
        output = type("Tensor", (), {"shape": (None, 2, 2, 8)})()

        def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
            return np.zeros((len(batch), 2, 2, 8), dtype=np.float16)

    paths, _, _ = sample_split(per_class=2)
    images = pd.DataFrame({"sha256": [f"{i:064x}" for i in range(len(paths))], "path": [str(p) for p in paths]})
    info = {"backbone": "mobilenet", "precision": "float16"}
    with pytest.raises(UserError, match=r"features@mobilenet: every feature value is 0 in float16"):
        compute_features(Underflowing(), images, "/", tmp_path / "features", 32, 4, info)
    assert list(tmp_path.iterdir()) == []  # no features directory, complete or not

    with pytest.raises(UserError, match=r"every feature value is 0 in float16 .*bfloat16"):
        check_values("features@mobilenet", nonfinite=0, nonzero=0, images=10, precision="float16")
    with pytest.raises(UserError, match=r"3 feature values are NaN or infinite in float16"):
        check_values("features@vgg16", nonfinite=3, nonzero=100, images=10, precision="float16")
    check_values("features@vgg16", nonfinite=0, nonzero=1, images=10, precision="float32")


def test_precision_params_are_validated_with_the_fix() -> None:
    import yaml

    from imgclf.features.device import precision_for
    from imgclf.params import validate

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["features"]["precision"] = "bfloat16"
    params["features"]["precision_overrides"]["mobilenet"] = "float32"
    checked = validate(params)
    assert precision_for(checked["features"], "vgg16") == "bfloat16"  # null: features.precision
    assert precision_for(checked["features"], "mobilenet") == "float32"
    every = {"vgg16": None, "vgg19": None, "mobilenet": None, "xception": None}
    for key, value, message in (
        ("precision", "half", "features.precision='half' is not one of: float32, bfloat16, float16"),
        ("precision_overrides", {**every, "resnet": "float32"}, "unknown backbone 'resnet'"),
        ("precision_overrides", {**every, "vgg16": "fp16"}, "features.precision_overrides.vgg16='fp16' is not one of"),
        ("precision_overrides", {"vgg16": None}, "features.precision_overrides has no entry for vgg19, mobilenet"),
    ):
        bad = yaml.safe_load((ROOT / "params.yaml").read_text())
        bad["features"][key] = value
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate(bad)


def test_the_gpu_requirements_are_the_cpu_ones_with_tensorflows_cuda_build() -> None:
    """requirements-gpu.txt cannot include requirements.txt (tensorflow-cpu and tensorflow would share files):
    it repeats it, and must not drift from it."""

    def pins(name: str) -> list[str]:
        lines = (ROOT / name).read_text().splitlines()
        return [line.split(" #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]

    cpu, gpu = pins("requirements.txt"), pins("requirements-gpu.txt")
    assert "tensorflow-cpu==2.21.0" in cpu and "tensorflow[and-cuda]==2.21.0" in gpu
    assert [p for p in gpu if p != "tensorflow[and-cuda]==2.21.0"] == [p for p in cpu if p != "tensorflow-cpu==2.21.0"]


def test_a_ray_worker_checks_the_precision_on_its_own_machine(monkeypatch) -> None:
    """float16 on Ray with CPU workers: the driver may have a GPU, the worker has none; the worker stops."""
    from types import SimpleNamespace

    from imgclf.core.errors import UserError
    from imgclf.features import device
    from imgclf.features.engine_ray import BatchModel

    worker = BatchModel.__new__(BatchModel)  # as Ray builds it, without loading a real model
    worker.gpus = 0
    layer = SimpleNamespace(dtype_policy=SimpleNamespace(name="mixed_float16"))
    worker.model = SimpleNamespace(name="vgg16_extractor", layers=[layer])
    monkeypatch.setattr(device, "visible_gpus", lambda: [])
    with pytest.raises(UserError, match="vgg16_extractor is float16, but TensorFlow sees no GPU"):
        worker.check_device()
    layer.dtype_policy = SimpleNamespace(name="float32")
    worker.check_device()  # float32: fine, and checked once
    assert worker.checked
