"""Near-copy confirmation, measured on real images (issue 32): which measure confirms a perceptual-hash
candidate, at which threshold, and what the rule then catches and wrongly takes.

    apt-get install -y dataset-fashion-mnist
    python bench/near_copies.py choose [--images 10000]      # the measure and its threshold
    python bench/near_copies.py check [--work /tmp/imgclf-lookalikes]   # the pipeline on held-out look-alikes

choose: the first `--images` Fashion-MNIST training images, upscaled to 56 px (small centred objects on black,
the hard case for a 64-bit hash). Look-alikes: every pair of distinct images within 4 bits (the pipeline's
default candidate rule). Re-exports: 300 of the images, each written again as a user's tools would (JPEG
quality 60-95, PNG to JPEG, resized 0.5-2x, brightness and contrast +-5%, 16-bit PNG, and a combination) and
decoded by the pipeline's own decoder. For each thumbnail side (16, 32, 64 px), the correlation of the grey
thumbnails (imgclf.data.groups.thumbnail_correlation) for every look-alike candidate and for every re-export
against its original: the threshold that keeps 99% of the re-exports, and the share of look-alike candidates
it would confirm.

check: a DVC project with this repository's pipeline on images the choice never saw: 4,000 images of the four
look-alike classes (t-shirt, pullover, coat, shirt; 3,200 from training images 30,000 on as Training/, 800
test images as Testing/), plus 30 planted re-exports of Testing images in Training/ and 30 planted re-exports
of Training images beside their originals. Runs `dvc repro split` and reports: training originals held out,
planted test re-exports blocked, planted training copies in their original's split, candidates, confirmed,
largest group, and prepare's time with its confirmation's share.

Writes bench/results-near-copies.json (one key per command) and prints what it found.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench/results-near-copies.json"
LOOKALIKES = {0: "tshirt_top", 2: "pullover", 4: "coat", 6: "shirt"}
SIDE = 56
SIDES = (16, 32, 64)


def save(results: dict[str, Any], key: str) -> None:
    from machine import cpu_model

    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    old[key] = {"machine": cpu_model(), **results}
    RESULTS.write_text(json.dumps(old, indent=2) + "\n")


def upscaled(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(image).resize((SIDE, SIDE), Image.Resampling.BILINEAR)


def re_exports(im: Any) -> dict[str, bytes]:
    """The same picture written again as a user's tools would: name -> file bytes."""
    from PIL import Image, ImageEnhance

    def encoded(x: Any, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        x.save(buf, fmt, **kw)
        return buf.getvalue()

    out = {f"jpeg{q}": encoded(im, "JPEG", quality=q) for q in (60, 75, 95)}
    out["png_to_jpeg90"] = encoded(Image.open(io.BytesIO(encoded(im, "PNG"))), "JPEG", quality=90)
    for factor in (0.5, 0.75, 1.5, 2.0):
        side = round(SIDE * factor)
        out[f"resize{factor}"] = encoded(im.resize((side, side), Image.Resampling.LANCZOS), "PNG")
    for sign in (-1, 1):
        out[f"brightness{sign * 5:+d}%"] = encoded(ImageEnhance.Brightness(im).enhance(1 + sign * 0.05), "PNG")
        out[f"contrast{sign * 5:+d}%"] = encoded(ImageEnhance.Contrast(im).enhance(1 + sign * 0.05), "PNG")
    wide = Image.fromarray((np.asarray(im, dtype=np.uint16) * 257).astype(np.uint16))
    out["png16"] = encoded(wide, "PNG")
    shifted = ImageEnhance.Brightness(im.resize((84, 84), Image.Resampling.BICUBIC)).enhance(1.03)
    out["jpeg70_resize1.5_brightness+3%"] = encoded(shifted, "JPEG", quality=70)
    return out


def decode(data: bytes, suffix: str, folder: Path) -> Any:
    """Through the pipeline's own decoder, from a file, as prepare reads it."""
    from imgclf.data.images import DEFAULT_RECIPE, decode_image

    path = folder / f"x{suffix}"
    path.write_bytes(data)
    return decode_image(path, DEFAULT_RECIPE)[0]


def choose(count: int) -> None:
    from fashion70k import idx

    from imgclf.data.groups import (
        confirmation_thumbnail,
        hamming_pairs,
        perceptual_hash,
        thumbnail_correlation,
    )

    images = idx("train-images-idx3-ubyte.gz")[:count]
    pictures = [upscaled(x) for x in images]
    start = time.perf_counter()
    hashes = np.array([int(perceptual_hash(p), 16) for p in pictures], dtype=np.uint64)
    hash_seconds = time.perf_counter() - start
    a, b, _ = hamming_pairs(hashes, 4)
    thumbs = {}
    for side in SIDES:
        start = time.perf_counter()
        thumbs[side] = np.stack([confirmation_thumbnail(p, side) for p in pictures])
        thumbs[f"{side}s"] = time.perf_counter() - start
    rng = np.random.default_rng(0)
    chosen = rng.choice(count, 300, replace=False)
    kinds: dict[str, dict[int, list[float]]] = {}
    hash_hits: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in chosen.tolist():
            for name, data in re_exports(pictures[i]).items():
                copy = decode(data, ".jpg" if "jpeg" in name else ".png", Path(tmp))
                hash_hits[name] = hash_hits.get(name, 0) + int(
                    np.bitwise_count(np.uint64(int(perceptual_hash(copy), 16)) ^ hashes[i]) <= 4
                )
                for side in SIDES:
                    pair = np.stack([thumbs[side][i], confirmation_thumbnail(copy, side)])
                    score = float(thumbnail_correlation(pair, np.array([0]), np.array([1]))[0])
                    kinds.setdefault(name, {}).setdefault(side, []).append(score)
    results: dict[str, Any] = {
        "images": count,
        "size_px": SIDE,
        "hash_seconds": round(hash_seconds, 2),
        "lookalike_candidates": len(a),
        "re_exports": 300 * len(kinds),
        "re_export_hash_within_4": {k: round(v / 300, 3) for k, v in hash_hits.items()},
        "sides": {},
    }
    for side in SIDES:
        lookalike = thumbnail_correlation(thumbs[side], a, b)
        copies = np.concatenate([kinds[k][side] for k in kinds])
        keep99 = float(np.quantile(copies, 0.01))
        per_kind = {k: round(float(np.min(v[side])), 4) for k, v in kinds.items()}
        results["sides"][side] = {
            "thumbnail_seconds_per_1000": round(thumbs[f"{side}s"] / count * 1000, 3),
            "re_export_score_p1": round(keep99, 4),
            "re_export_min_by_kind": per_kind,
            "lookalike_score_quantiles": {
                q: round(float(np.quantile(lookalike, q)), 4) for q in (0.5, 0.9, 0.99, 0.999)
            },
            "lookalikes_confirmed_at": {
                t: int(np.count_nonzero(lookalike >= t)) for t in (0.95, 0.97, 0.98, 0.99, 0.995)
            },
            "re_exports_kept_at": {t: round(float(np.mean(copies >= t)), 4) for t in (0.95, 0.97, 0.98, 0.99, 0.995)},
        }
    print(json.dumps(results, indent=2))
    save(results, "choose")


def write_lookalike_project(work: Path) -> dict[str, Any]:
    """The check's images, its planted copies and a DVC project with this pipeline; returns the plants."""
    from fashion70k import copy_pipeline, idx

    shutil.rmtree(work, ignore_errors=True)
    project = work / "project"
    images = project / "images"
    rng = np.random.default_rng(1)
    parts = {"Training": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 30_000, 3200),
             "Testing": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 0, 800)}  # fmt: skip
    written: dict[str, list[tuple[str, Any]]] = {}
    for part, (images_file, labels_file, first, wanted) in parts.items():
        data, labels = idx(images_file), idx(labels_file)
        picked = [i for i in range(first, len(data)) if labels[i] in LOOKALIKES][:wanted]
        for i in picked:
            folder = images / part / LOOKALIKES[int(labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            picture = upscaled(data[i])
            name = f"{part.lower()}_{i:05d}.png"
            picture.save(folder / name)
            written.setdefault(part, []).append((f"{part}/{LOOKALIKES[int(labels[i])]}/{name}", picture))
    plants: dict[str, list[tuple[str, str]]] = {"test_in_training": [], "training_copy": []}
    for kind, part in (("test_in_training", "Testing"), ("training_copy", "Training")):
        for k in rng.choice(len(written[part]), 30, replace=False).tolist():
            original, picture = written[part][k]
            label = original.split("/")[1]
            exports = re_exports(picture)
            name = list(exports)[k % 13]
            data = exports[name]
            copy = f"Training/{label}/planted_{kind}_{k:04d}{'.jpg' if 'jpeg' in name else '.png'}"
            (images / copy).write_bytes(data)
            plants[kind].append((original, copy))
    copy_pipeline(project)
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["root"] = "images"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=project, check=True)
    return plants


def check(work: Path) -> None:
    import pandas as pd

    plants = write_lookalike_project(work)
    project = work / "project"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "split"], cwd=project, check=True)
    seconds = time.perf_counter() - start
    log = (project / "logs/imgclf.log").read_text()
    home = {}
    for name in ("train", "val", "test"):
        home.update(dict.fromkeys(pd.read_csv(project / f"data/split/{name}.csv", dtype=str).path, name))
    held = set(pd.read_csv(project / "data/split/held_out.csv", dtype=str).path)
    planted = {copy for pairs in plants.values() for _, copy in pairs}
    originals_in_training = [p for p in home | dict.fromkeys(held) if p.startswith("Training/") and p not in planted]
    held_originals = [p for p in held if p not in planted]
    metrics = json.loads((project / "metrics/prepare.json").read_text())
    timing = re.findall(r"prepare: .*near-duplicate.*", log)
    results = {
        "images": {"training_originals": len(originals_in_training), "planted": len(planted)},
        "training_originals_held_out": len(held_originals),
        "training_originals_held_out_share": round(len(held_originals) / len(originals_in_training), 4),
        "planted_test_re_exports_blocked": sum(copy in held for _, copy in plants["test_in_training"]),
        "planted_training_copies_with_original": sum(
            home.get(copy) is not None and home.get(copy) == home.get(original)
            for original, copy in plants["training_copy"]
        ),
        "prepare_metrics": metrics,
        "prepare_log": timing,
        "dvc_repro_split_seconds": round(seconds, 1),
    }
    print(json.dumps(results, indent=2))
    save(results, "check")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["choose", "check"])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf-lookalikes"))
    args = parser.parse_args()
    choose(args.images) if args.command == "choose" else check(args.work)


if __name__ == "__main__":
    main()
