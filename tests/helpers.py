"""Shared test helpers: tiny real datasets and a temporary copy of the project to run DVC in."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# What a temporary project needs: the pipeline definition, the code, the params.
# weights/: its README only (the folder must exist: it is a dependency of features@), never weights files.
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "imgclf", "pyproject.toml", ".gitignore", ".dvcignore",
                 "weights/README.md"]  # fmt: skip

E2E_BACKBONES = ["vgg16", "mobilenet"]  # the fastest two; every registry entry is built in test_backbones.py
TINY = {
    "data.root": "images",
    "backbones": E2E_BACKBONES,
    "features.weights": "none",
    "features.image_size": 64,  # a 2x2 feature map: the attention has positions to choose from
    # The end-to-end runs exercise both precisions: VGG16's pass (and its fine-tuning, evaluate, predict) in
    # bfloat16, MobileNet's in float32 through the per-backbone override.
    "features.precision": "bfloat16",
    "features.precision_overrides": {"vgg16": None, "mobilenet": "float32"},
    "train.epochs": 6,
    "train.early_stopping.patience": 3,
    "evaluate.bootstrap": 200,
    "evaluate.attention_images_per_class": 1,
    "evaluate.explain_images": 6,  # sanity and deletion/insertion on 6 test images, 4 steps: plumbing, not a verdict
    "evaluate.explain_steps": 4,
    "split.val": 0.2,
    "split.test": 0.25,
    # data.near_duplicates stays at its default, group: the end-to-end runs keep near-copies in one split.
}


def shape_image(kind: int, size: int, rng: np.random.Generator, vary: bool = False) -> np.ndarray:
    """A (size, size) uint8 image whose class is visible: 0 horizontal bar, 1 vertical bar, 2 square, 3 ring.
    By default a class's images differ only in noise, brightness and a 2-pixel shift, so squares and above all
    rings are near-copies by perceptual hash (groups of 12-35 of 60 at 40 px; bars stay apart); `vary` draws
    position, width and radius over a wide range (shapes may be cut by the border), so nearly every image is its
    own group, as in a real dataset."""
    img = rng.integers(0, 40, size=(size, size)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if vary:
        cy, cx = rng.integers(size // 4, 3 * size // 4 + 1, size=2)
        w = int(rng.integers(max(2, size // 10), max(3, size // 5) + 1))
        radius = rng.uniform(size / 6, size / 3.5)
    else:
        cy = cx = size // 2 + rng.integers(-2, 3)
        w, radius = max(2, size // 6), size / 4
    if kind == 0:
        mask = np.abs(yy - cy) < w
    elif kind == 1:
        mask = np.abs(xx - cx) < w
    elif kind == 2:
        mask = (np.abs(yy - cy) < 2 * w) & (np.abs(xx - cx) < 2 * w)
    else:
        r = np.hypot(yy - cy, xx - cx)
        mask = (r > radius) & (r < radius + w)
    img[mask] = 200 + rng.integers(0, 55)
    return img


def make_dataset(
    root: Path,
    counts: dict[str, int],
    size: int = 32,
    seed: int = 0,
    rgb: bool = False,
    vary: bool = False,
) -> Path:
    """Write a folder of class sub-folders of PNGs whose classes are learnable (bars, squares, rings); `vary`:
    see shape_image."""
    rng = np.random.default_rng(seed)
    for kind, (label, n) in enumerate(counts.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = shape_image(kind % 4, size, rng, vary)
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
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / name)
    run(["git", "init", "-q"], project)
    run(["git", "config", "user.email", "test@example.invalid"], project)
    run(["git", "config", "user.name", "imgclf tests"], project)
    run([sys.executable, "-m", "dvc", "init", "-q"], project)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], project)
    # The offline plots page and the legible chart template, configured as in this repository.
    shutil.copy2(ROOT / ".dvc" / "plots_template.html", project / ".dvc" / "plots_template.html")
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")
    run([sys.executable, "-m", "dvc", "config", "plots.html_template", "plots_template.html"], project)
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
    """The environment for subprocesses: this interpreter's `python` first on PATH. Stages run as
    `python -m stages.<name>` from the project, so they import the project's own imgclf/ (its copy, not
    this checkout's) without help; `python -m imgclf` from elsewhere finds the project's copy through
    PYTHONPATH."""
    out = dict(os.environ)
    out["PATH"] = os.path.dirname(sys.executable) + os.pathsep + out.get("PATH", "")
    out["PYTHONPATH"] = str(cwd) + os.pathsep + out.get("PYTHONPATH", "")
    out.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user has: the stages quiet TensorFlow themselves
    return out


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=environ or env(cwd), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
            f"--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def dvc(
    project: Path, *args: str, check: bool = True, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], project, check=check, environ=environ)


def git_status(project: Path) -> str:
    return run(["git", "status", "--porcelain"], project).stdout


# What TensorFlow's C++ core prints at start-up unless the stages filter it.
TF_CHATTER = ("oneDNN custom operations", "absl::InitializeLog", "use_unbounded_threadpool", "cpu_feature_guard")


# --- hostile files: every kind of bad or unusual file a real folder holds ---

RGB = np.array([[[200, 30, 60]] * 24] * 24, dtype=np.uint8)  # (24, 24, 3)


def png_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def exif_rotated() -> bytes:
    im = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return jpeg_bytes(im, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    im = Image.fromarray(RGB).convert("P")
    return png_bytes(im, transparency=0)


def gray16() -> bytes:
    data = np.full((24, 24), 32768, dtype=np.uint16)
    data[0, 0] = 65535
    return png_bytes(Image.fromarray(data))


def rgba_transparent() -> bytes:
    data = np.zeros((24, 24, 4), dtype=np.uint8)  # fully transparent black
    return png_bytes(Image.fromarray(data, mode="RGBA"))


def truncated() -> bytes:
    return png_bytes(Image.fromarray(RGB))[:-40]


# name (relative to root) -> (bytes factory, expected status, expected reason fragment)
HOSTILE: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "cat/plain rgb.png": (lambda: png_bytes(Image.fromarray(RGB)), "ok", ""),
    "cat/grayscale.png": (lambda: png_bytes(Image.fromarray(RGB[..., 0])), "ok", ""),
    "cat/cmyk.jpg": (lambda: jpeg_bytes(Image.fromarray(RGB).convert("CMYK")), "ok", ""),
    "cat/rgba.png": (rgba_transparent, "ok", ""),
    "cat/palette.png": (palette_with_transparency, "ok", ""),
    "cat/gray16.png": (gray16, "ok", ""),
    "cat/rotated.jpg": (exif_rotated, "ok", ""),
    "cat/ñandú été 猫.png": (lambda: png_bytes(Image.fromarray(RGB[:, :, ::-1])), "ok", ""),
    "cat/truncated.png": (truncated, "skipped", "truncated or corrupt"),
    "cat/garbage.jpg": (lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "skipped", "not a decodable image"),
    "cat/truncated.jpg": (lambda: jpeg_bytes(Image.fromarray(RGB))[:300], "skipped", "truncated or corrupt"),
    "cat/empty.png": (lambda: b"", "skipped", "empty file"),
    "cat/text.png": (lambda: b"this is not an image\n" * 10, "skipped", "not a decodable image"),
    "cat/bomb.png": (lambda: png_bytes(Image.new("L", (200, 200))), "skipped", "decompression bomb"),
    "cat/tiny.png": (lambda: png_bytes(Image.new("RGB", (8, 8))), "skipped", "too small"),
    "cat/.DS_Store": (lambda: b"\x00\x00\x00\x01Bud1", "skipped", "hidden or system file"),
    "cat/Thumbs.db": (lambda: b"\xd0\xcf\x11\xe0", "skipped", "hidden or system file"),
    "cat/._plain.png": (lambda: b"\x00\x05\x16\x07", "skipped", "hidden or system file"),
    "cat/notes.txt": (lambda: b"acquired 2024", "skipped", "not an image extension"),
    "stray.png": (lambda: png_bytes(Image.fromarray(RGB)), "skipped", "not in a class folder"),
    "dog/dog.png": (lambda: png_bytes(Image.fromarray(RGB[::-1])), "ok", ""),
}


def write_hostile_files(root: Path, rename: dict[str, str] | None = None) -> list[str]:
    """Write every HOSTILE file under root (class folders renamed by `rename`); return their relative paths."""
    written = []
    for name, (factory, _, _) in HOSTILE.items():
        for old, new in (rename or {}).items():
            name = name.replace(f"{old}/", f"{new}/", 1)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(factory())
        written.append(name)
    return written
