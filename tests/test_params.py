"""params.yaml is validated when a stage starts: each message names the key, the value and the fix."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, env

from imgclf.core.errors import UserError
from imgclf.params import images_shown, load_params, train_params, validate

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def changed(**dotted) -> dict:
    params = copy.deepcopy(DEFAULTS)
    for key, value in dotted.items():
        node = params
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return params


def renamed(old: str, new: str) -> dict:
    params = copy.deepcopy(DEFAULTS)
    params[new] = params.pop(old)
    return params


CASES = {
    "unknown backbone": (
        changed(backbones=["vgg16", "resnet50"]),
        "unknown backbone 'resnet50'; known backbones: vgg16",
    ),
    "image size below xception's minimum": (
        changed(features__image_size=64),
        "features.image_size=64 is below xception's minimum of 71; raise it or drop xception from backbones",
    ),
    "split ratio above 1": (changed(split__val=1.5), "split.val=1.5 must be strictly between 0 and 1"),
    "split ratio zero": (changed(split__test=0), "split.test=0 must be strictly between 0 and 1"),
    "no training data left": (changed(split__val=0.5, split__test=0.5), "leaving no training data"),
    "weights path missing": (changed(features__weights="/no/such/vgg.h5"), "features.weights='/no/such/vgg.h5'"),
    "zero epochs": (changed(train__epochs=0), "train.epochs=0 must be positive"),
    "negative batch size": (changed(train__batch_size=-8), "train.batch_size=-8 must be positive"),
    "typo in a section": (renamed("train", "trian"), "unknown key 'trian' in params.yaml; did you mean 'train'?"),
    "typo in a key": (
        changed(train__early_stopping={"monitor": "val_loss", "patience": 3, "patiance": 3}),
        "unknown key 'train.early_stopping.patiance' in params.yaml; did you mean 'train.early_stopping.patience'?",
    ),
    "bad choice": (changed(balance__method="smote"), "balance.method='smote' is not one of: none, random_over"),
    "override of unknown key": (
        changed(train__overrides={"vgg16": {"lrr": 0.1}}),
        "unknown key 'train.overrides.vgg16.lrr' in params.yaml; did you mean 'train.overrides.vgg16.lr'?",
    ),
    "no override entry for a backbone": (
        changed(train__overrides={"vgg16": {}, "vgg19": {}, "mobilenet": {}}),
        "train.overrides has no entry for xception; add `xception: {}` under train.overrides (one entry per "
        "backbone in backbones, empty for none)",
    ),
    "window": (
        changed(data__window=[99, 1]),
        "data.window=[99, 1] must be two percentiles [low, high] with 0 <= low < high <= 100",
    ),
    "show images": (changed(data__show_images="yes"), "data.show_images='yes' must be auto, true or false"),
    "high bit depth rule": (
        changed(data__high_bit_depth="clip"),
        "data.high_bit_depth='clip' is not one of: window, bit_depth, full_range",
    ),
}


def test_defaults_are_valid() -> None:
    assert validate(copy.deepcopy(DEFAULTS))["backbones"] == ["vgg16", "vgg19", "mobilenet", "xception"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_params_name_the_key_value_and_fix(case: str) -> None:
    params, message = CASES[case]
    with pytest.raises(UserError) as info:
        validate(params)
    assert message in str(info.value)


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("lr: 0.0003 ", "lr: 3e-4 "))
    assert load_params(path)["train"]["lr"] == pytest.approx(3e-4)


def test_per_backbone_override_applies_to_that_backbone_only() -> None:
    overrides = {**DEFAULTS["train"]["overrides"], "xception": {"lr": 0.0005, "early_stopping": {"patience": 2}}}
    params = validate(changed(train__overrides=overrides))
    assert train_params(params, "xception")["lr"] == 0.0005
    assert train_params(params, "xception")["early_stopping"] == {"monitor": "val_loss", "patience": 2}
    assert train_params(params, "vgg16")["lr"] == DEFAULTS["train"]["lr"]


def test_a_stage_with_bad_params_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    for name in ("params.yaml",):
        (tmp_path / name).write_text(yaml.safe_dump(renamed("train", "trian")))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages/split.py"), "--manifest", "m.csv", "--out-dir", "out"],
        cwd=tmp_path,
        env=env(ROOT),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown key 'trian' in params.yaml; did you mean 'train'?"


def test_a_weights_file_outside_the_weights_folder_is_refused(tmp_path: Path, monkeypatch) -> None:
    """DVC tracks weights/ as features@'s dependency: a file elsewhere could be replaced without a rerun.
    Inside (or symlinked inside, DVC hashes the target) it is accepted."""
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "elsewhere" / "vgg16.h5"
    outside.parent.mkdir()
    outside.write_bytes(b"weights")
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError, match=r"points outside the project's weights/ folder .*symlink the file into"):
        validate(changed(features__weights=str(outside)))
    (tmp_path / "weights" / "vgg16.h5").symlink_to(outside)
    assert validate(changed(features__weights="weights/{backbone}.h5", backbones=["vgg16"]))
    # A symlinked *folder* is not looked into by DVC's directory hashing: refused too.
    (tmp_path / "weights" / "keras").symlink_to(outside.parent)
    with pytest.raises(UserError, match="points outside the project's weights/ folder"):
        validate(changed(features__weights="weights/keras/{backbone}.h5", backbones=["vgg16"]))


def test_bit_depth_needs_the_datasets_bits_and_max_pixels_stays_within_pillows_hard_limit() -> None:
    with pytest.raises(UserError, match=r"data.high_bit_depth=bit_depth scales every image by the dataset's bit depth"):
        validate(changed(data__high_bit_depth="bit_depth"))
    assert validate(changed(data__high_bit_depth="bit_depth", data__bits_stored=12))
    with pytest.raises(UserError, match=r"data.max_pixels=200000000 is above 178956970"):
        validate(changed(data__max_pixels=200_000_000))


@pytest.mark.parametrize(
    ("setting", "dicom_read", "by", "shown", "warned"),
    [
        ("auto", False, "none", True, False),
        ("auto", True, "none", False, False),  # DICOM read: patients' images
        ("auto", False, "pattern", False, False),  # subjects keyed: patients' images
        (True, True, "dicom", True, True),  # an explicit true wins, with a warning
        (True, False, "none", True, False),
        (False, False, "none", False, False),
    ],
)
def test_show_images_auto_withholds_patients_pixels(setting, dicom_read, by, shown, warned, caplog) -> None:
    data = validate(
        changed(data__show_images=setting, data__groups={**DEFAULTS["data"]["groups"], "by": by, "pattern": "p(\\d+)_"})
    )["data"]
    with caplog.at_level("INFO", logger="imgclf"):
        assert images_shown(data, dicom_read, "eda") is shown
    assert any("patients' pixels go into the committed plots" in r.message for r in caplog.records) is warned
