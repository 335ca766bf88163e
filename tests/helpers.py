"""Shared test helpers: tiny real datasets and a temporary copy of the project to run DVC in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# What a temporary project needs: the pipeline definition, the code, the params.
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "imgclf", "pyproject.toml"]

E2E_BACKBONES = ["vgg16", "mobilenet"]  # the fastest two; every registry entry is built in test_backbones.py
TINY = {
    "data.root": "images",
    "backbones": E2E_BACKBONES,
    "features.weights": "none",
    "features.image_size": 64,  # a 2x2 feature map: the attention has positions to choose from
    "train.epochs": 6,
    "train.early_stopping.patience": 3,
    "evaluate.bootstrap": 200,
    "evaluate.attention_images_per_class": 1,
    "split.val": 0.2,
    "split.test": 0.25,
}


def shape_image(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) uint8 image whose class is visible: 0 horizontal bar, 1 vertical bar, 2 square, 3 ring."""
    img = rng.integers(0, 40, size=(size, size)).astype(np.uint8)
    c, w = size // 2 + rng.integers(-2, 3), max(2, size // 6)
    yy, xx = np.mgrid[:size, :size]
    if kind == 0:
        mask = np.abs(yy - c) < w
    elif kind == 1:
        mask = np.abs(xx - c) < w
    elif kind == 2:
        mask = (np.abs(yy - c) < 2 * w) & (np.abs(xx - c) < 2 * w)
    else:
        r = np.hypot(yy - c, xx - c)
        mask = (r > size / 4) & (r < size / 4 + w)
    img[mask] = 200 + rng.integers(0, 55)
    return img


def make_dataset(
    root: Path,
    counts: dict[str, int],
    size: int = 32,
    seed: int = 0,
    rgb: bool = False,
) -> Path:
    """Write a folder of class sub-folders of PNGs whose classes are learnable (bars, squares, rings)."""
    rng = np.random.default_rng(seed)
    for kind, (label, n) in enumerate(counts.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = shape_image(kind % 4, size, rng)
            im = Image.fromarray(np.stack([img] * 3, axis=-1) if rgb else img)
            im.save(folder / f"{label}_{i:03d}.png")
    return root


def make_project(tmp_path: Path, params_update: dict[str, Any] | None = None) -> Path:
    """A temporary git + DVC project with this repository's pipeline and code."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, project / name)
    run(["git", "init", "-q"], project)
    run(["git", "config", "user.email", "test@example.invalid"], project)
    run(["git", "config", "user.name", "imgclf tests"], project)
    run([sys.executable, "-m", "dvc", "init", "-q"], project)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], project)
    if params_update:
        update_params(project, params_update)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "start"], project)  # dvclive needs a commit to log in a git repository
    return project


def update_params(project: Path, update: dict[str, Any]) -> None:
    """Set dotted keys in the project's params.yaml, e.g. {"features.weights": "none"}."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in update.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def env(cwd: Path) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's `python` first on PATH, and the imgclf
    package of the project in `cwd` (its copy, not this checkout's) first on the import path."""
    out = dict(os.environ)
    out["PATH"] = os.path.dirname(sys.executable) + os.pathsep + out.get("PATH", "")
    out["PYTHONPATH"] = str(cwd) + os.pathsep + out.get("PYTHONPATH", "")
    out["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(cwd), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
            f"--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], project, check=check)
