"""Benchmarks: cached features against the frozen backbone inside model.fit, and where the time goes.

    python bench/bench.py --quick            # under 10 minutes on 2 cores: 64 px, 128 images, 3 repeats
    python bench/bench.py --full             # 224 px, 512 images, 5 repeats (about an hour on 2 cores)

Writes bench/results-<mode>.json and prints a markdown table. Run it on an otherwise idle machine.
What it measures, per backbone, on the same images, the same head and the same number of epochs:

1. training time: features once + head on features (the pipeline) against the frozen backbone inside
   model.fit on images for the same epochs (the original notebook's way); the baseline gets its images as
   in-memory arrays, so it pays for compute only (a conservative comparison).
2. input pipeline: features@<bb>'s images/s (decode + resize + backbone, from files) against the backbone's
   forward pass alone on tensors already in memory, same batch size.
3. memory: peak RSS of feature extraction on 500 and on 2,000 images (fresh process each).
4. re-run cost: a no-op `dvc repro` and `dvc repro` after a head-only param change, on the bundled sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODES = {
    "quick": {"size": 64, "images": 128, "repeats": 3, "epochs": 10, "batch": 32, "rss_images": [500, 2000]},
    "medium": {"size": 224, "images": 512, "repeats": 1, "epochs": 10, "batch": 32, "rss_images": [500, 2000]},
    "full": {"size": 224, "images": 512, "repeats": 5, "epochs": 10, "batch": 32, "rss_images": [500, 2000]},
}


def sample_paths(n: int) -> list[Path]:
    """n image paths from the bundled sample, cycled when n exceeds it (extraction does not deduplicate)."""
    paths = sorted((ROOT / "data/sample").rglob("*.png"))
    return [paths[i % len(paths)] for i in range(n)]


def size_for(backbone: str, cfg: dict) -> int:
    """The mode's image size, raised to the backbone's minimum (Xception: 71) where needed."""
    from imgclf.features.backbones import get_backbone

    return max(cfg["size"], get_backbone(backbone).min_size)


def build(backbone: str, size: int):
    from imgclf.features.backbones import build_backbone, get_backbone
    from imgclf.features.extractor import build_extractor

    model, _ = build_backbone(get_backbone(backbone), size, "none")
    return build_extractor(model, backbone, size, "backbone")


def head_for(shape, classes: int, features=None):
    from imgclf.head.model import build_attention_head

    stats = {}
    if features is not None:
        stats = {"feature_mean": features.mean(axis=(0, 1, 2)), "feature_variance": features.var(axis=(0, 1, 2))}
    return build_attention_head(tuple(shape), classes, token_dim=256, heads=4, key_dim=32, dense_units=128, **stats)


def fit(model, x, y, epochs: int, batch: int) -> None:
    from imgclf.head.training import compile_model

    compile_model(model, 3e-4)
    model.fit(x, y, epochs=epochs, batch_size=batch, shuffle=True, verbose=0)


def training_time(backbone: str, cfg: dict) -> dict:
    """Seconds for the pipeline (features once + head) and the baseline (backbone inside fit), per repeat."""
    cfg = {**cfg, "size": size_for(backbone, cfg)}
    import numpy as np

    from imgclf.core.repro import seed_everything
    from imgclf.data.images import load_image
    from imgclf.features.backbone_pass import iter_features
    from imgclf.head.model import build_end_to_end

    seed_everything(0)
    paths = sample_paths(cfg["images"])
    labels = np.array([["ankle_boot", "coat", "dress", "sneaker"].index(p.parent.name) for p in paths])
    images = np.stack([load_image(p, cfg["size"]) for p in paths])
    extractor = build(backbone, cfg["size"])
    cached, baseline, head_only = [], [], []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        features = np.concatenate(list(iter_features(extractor, paths, cfg["size"], cfg["batch"])))
        mid = time.perf_counter()
        fit(head_for(features.shape[1:], 4, features), features, labels, cfg["epochs"], cfg["batch"])
        end = time.perf_counter()
        cached.append(end - start)
        head_only.append(end - mid)
        full = build_end_to_end(extractor, head_for(features.shape[1:], 4, features), f"{backbone}_baseline")
        start = time.perf_counter()
        fit(full, images, labels, cfg["epochs"], cfg["batch"])
        baseline.append(time.perf_counter() - start)
    return {
        "cached_s": statistics.median(cached),
        "head_s": statistics.median(head_only),
        "baseline_s": statistics.median(baseline),
        "speedup": statistics.median(baseline) / statistics.median(cached),
    }


def input_pipeline(backbone: str, cfg: dict) -> dict:
    """images/s of extraction from files (decode + resize + forward) vs the forward pass on in-memory tensors."""
    cfg = {**cfg, "size": size_for(backbone, cfg)}
    import numpy as np

    from imgclf.data.images import load_image
    from imgclf.features.backbone_pass import iter_features

    paths = sample_paths(cfg["images"])
    extractor = build(backbone, cfg["size"])
    batches = [
        np.stack([load_image(p, cfg["size"]) for p in paths[i : i + cfg["batch"]]])
        for i in range(0, len(paths), cfg["batch"])
    ]
    extractor.predict_on_batch(batches[0])  # warm-up: graph tracing
    extractor.predict_on_batch(batches[-1])
    files, memory = [], []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        for _features in iter_features(extractor, paths, cfg["size"], cfg["batch"]):
            pass
        files.append(len(paths) / (time.perf_counter() - start))
        start = time.perf_counter()
        for batch in batches:
            extractor.predict_on_batch(batch)
        memory.append(len(paths) / (time.perf_counter() - start))
    files_ips, memory_ips = statistics.median(files), statistics.median(memory)
    return {"files_ips": files_ips, "tensor_ips": memory_ips, "ratio": files_ips / memory_ips}


def rss_child(backbone: str, n: int, size: int, batch: int) -> None:
    """In a fresh process: extract features for n images to disk as features@<bb> does; print peak RSS (MB)."""
    import pandas as pd

    from imgclf.features.reuse import compute_features

    paths = sample_paths(n)
    frame = pd.DataFrame({"sha256": [f"{i:064x}" for i in range(n)], "path": [str(p) for p in paths]})
    with tempfile.TemporaryDirectory() as tmp:
        compute_features(build(backbone, size), frame, "/", Path(tmp) / "f", size, batch, {"backbone": backbone})
    # VmHWM, the peak RSS of this process image. Not getrusage's ru_maxrss: Linux carries that over
    # fork and exec, so a child would report its parent's peak.
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": peak_kb / 1024}))


def memory(backbone: str, cfg: dict) -> dict:
    out = {}
    for n in cfg["rss_images"]:
        cmd = [sys.executable, __file__, "_rss", backbone, str(n), str(size_for(backbone, cfg)), str(cfg["batch"])]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[str(n)] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    small, large = (out[str(n)] for n in cfg["rss_images"])
    return {"rss_mb": out, "growth": large / small - 1}


def rerun_cost() -> dict:
    """A no-op `dvc repro` and one after a head-only change, on a copy of this checkout's bundled-sample run."""
    if not (ROOT / "data/features").is_dir():
        return {"skipped": "run `dvc repro` in the checkout first (the copy reuses its outputs and cache)"}
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        shutil.copytree(ROOT, project, symlinks=True, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}

        def timed(*args: str) -> tuple[float, str]:
            start = time.perf_counter()
            result = subprocess.run([*dvc, *args], cwd=project, env=env, capture_output=True, text=True, check=True)
            return time.perf_counter() - start, result.stdout

        noop, out = timed("repro")
        if "Data and pipelines are up to date" not in out:
            return {"skipped": "the checkout's pipeline is not up to date; run `dvc repro` first"}
        text = (project / "params.yaml").read_text().replace("  dropout: 0.3\n", "  dropout: 0.25\n")
        (project / "params.yaml").write_text(text)
        head, out = timed("repro")
        reran = sorted({line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")})
    return {"noop_s": noop, "head_change_s": head, "head_change_reran": reran}


def machine() -> dict:
    import tensorflow as tf

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "os": platform.platform(),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_rss":
        backbone, n, size, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        rss_child(backbone, n, size, batch)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the default")
    group.add_argument("--medium", action="store_true", help="224 px, 512 images, one repeat")
    group.add_argument("--full", action="store_true")
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "vgg19", "mobilenet", "xception"])
    parser.add_argument("--resume", action="store_true", help="keep what the results file already holds")
    parser.add_argument(
        "--parts", nargs="+", default=["training", "input_pipeline", "memory", "rerun"], help="what to (re)measure"
    )
    args = parser.parse_args()
    mode = "full" if args.full else "medium" if args.medium else "quick"
    cfg = MODES[mode]
    out = ROOT / f"bench/results-{mode}.json"
    results: dict = {"mode": mode, "config": cfg, "machine": machine(), "backbones": {}, "seconds": {}}
    if args.resume and out.is_file():
        results = {**json.loads(out.read_text()), "machine": machine()}
    measures = {"training": training_time, "input_pipeline": input_pipeline, "memory": memory}
    for backbone in args.backbones if any(part in measures for part in args.parts) else []:
        entry = results["backbones"].setdefault(backbone, {"size": size_for(backbone, cfg)})
        for part in args.parts:
            if part in measures:
                started = time.perf_counter()
                print(f"{backbone}: {part}...", file=sys.stderr, flush=True)
                entry[part] = measures[part](backbone, cfg)
                results["seconds"][f"{backbone} {part}"] = round(time.perf_counter() - started, 1)
                out.write_text(json.dumps(results, indent=2) + "\n")  # a crash later keeps what was measured
    if "rerun" in args.parts:
        started = time.perf_counter()
        results["rerun"] = rerun_cost()
        results["seconds"]["rerun"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    n_small, n_large = results["config"]["rss_images"]
    lines = [
        f"| backbone | px | cached s | (head s) | baseline s | speedup (≥5×) | files img/s | tensors img/s "
        f"| ratio (≥0.85) | RSS {n_small} MB | RSS {n_large} MB | growth (≤10%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["backbones"].items():
        cells = [name, str(r["size"])]
        t, p, m = r.get("training"), r.get("input_pipeline"), r.get("memory")
        cells += (
            [f"{t['cached_s']:.1f}", f"{t['head_s']:.1f}", f"{t['baseline_s']:.1f}", f"{t['speedup']:.1f}×"]
            if t
            else ["–"] * 4
        )
        cells += [f"{p['files_ips']:.0f}", f"{p['tensor_ips']:.0f}", f"{p['ratio']:.2f}"] if p else ["–"] * 3
        if m:
            cells += [f"{m['rss_mb'][str(n)]:.0f}" for n in (n_small, n_large)] + [f"{m['growth']:+.1%}"]
        else:
            cells += ["–"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    rerun = results.get("rerun", {"skipped": "not measured in this run"})
    if "skipped" in rerun:
        lines.append(f"\nre-run cost: skipped ({rerun['skipped']})")
    else:
        lines.append(
            f"\nno-op `dvc repro`: {rerun['noop_s']:.1f} s; after a head-only change: {rerun['head_change_s']:.1f} s "
            f"(reran: {', '.join(rerun['head_change_reran'])})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
