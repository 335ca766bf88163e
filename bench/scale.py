"""Scale benchmarks (issue 12): precision, the input pipeline at realistic sizes, streaming training memory.

    python bench/scale.py precision     # features@ vs the bare forward pass, per backbone, float32 and bfloat16,
                                        # 224 px, from 512x512 JPEGs (about 5 minutes on 2 cores)
    python bench/scale.py tuning        # batch size, loader threads, TensorFlow threads (VGG16 bf16, MobileNet)
    python bench/scale.py train-memory  # train@'s head fit, streamed vs in memory: peak RSS at 5,000 and 20,000
                                        # rows of 7x7x512, and seconds per epoch
    python bench/scale.py cached-vs-fit # VGG16 bfloat16 at 224 px: features once + head vs backbone inside fit

Each part writes bench/results-scale.json (merged with what is there) and prints a markdown table. Every
measurement that compares two things measures both in the same run, on the same images. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
RESULTS = ROOT / "bench/results-scale.json"
BACKBONES = ["vgg16", "vgg19", "mobilenet", "xception"]


def save(part: str, value: object) -> None:
    from bench import machine

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[part] = value
    results["machine"] = machine()
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def jpegs(folder: Path, n: int, side: int = 512) -> list[Path]:
    """n realistic JPEGs (side x side, quality 90, ~40-90 KB): sample images upscaled, with sensor-like noise
    so that they do not compress to nothing."""
    import numpy as np
    from PIL import Image

    sources = sorted((ROOT / "data/sample").rglob("*.png"))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if not path.is_file():
            image = Image.open(sources[i % len(sources)]).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (side, side, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def extractor(backbone: str, size: int, precision: str):
    from imgclf.features.backbones import build_backbone, get_backbone
    from imgclf.features.device import dtype_policy
    from imgclf.features.extractor import build_extractor

    with dtype_policy(precision):
        model, _ = build_backbone(get_backbone(backbone), size, "none")
    return build_extractor(model, backbone, size, "backbone")


def throughput(
    backbone: str,
    precision: str,
    paths: list[Path],
    size: int,
    batch: int,
    threads: int,
    jpeg_scaling: bool = True,
    repeats: int = 3,
) -> dict:
    """images/s of features@'s pass (files -> features.npy on disk) and of the bare forward pass on the same
    images already decoded in memory, same batch size; warm-up batches first (graph tracing); medians of
    `repeats` alternating runs."""
    import numpy as np
    import pandas as pd

    from imgclf.data.images import ImageRecipe, load_image
    from imgclf.features.reuse import compute_features

    recipe = ImageRecipe(jpeg_scaling=jpeg_scaling)  # as params.yaml's data section gives it
    model = extractor(backbone, size, precision)
    decoded = [np.stack([load_image(p, size) for p in paths[i : i + batch]]) for i in range(0, len(paths), batch)]
    model.predict_on_batch(decoded[0])
    model.predict_on_batch(decoded[-1])
    frame = pd.DataFrame({"sha256": [f"{i:064x}" for i in range(len(paths))], "path": [str(p) for p in paths]})
    bare, files = [], []
    for _ in range(repeats):  # alternating, so that a slow spell of the machine hits both
        start = time.perf_counter()
        for x in decoded:
            model.predict_on_batch(x)
        bare.append(len(paths) / (time.perf_counter() - start))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            compute_features(
                model, frame, "/", Path(tmp) / "f", size, batch, {"backbone": backbone}, recipe, threads=threads,
                save_extractor=False,
            )  # fmt: skip
            files.append(len(paths) / (time.perf_counter() - start))
    b, f = statistics.median(bare), statistics.median(files)
    return {"bare_ips": round(b, 1), "features_ips": round(f, 1), "ratio": round(f / b, 3), "repeats": repeats}


def child(args: list[str]) -> dict:
    """Run `scale.py _child ...` in a fresh process (TensorFlow's thread settings apply at start-up)."""
    result = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def precision_part(n: int) -> None:
    paths = [str(p) for p in jpegs(Path(tempfile.gettempdir()) / "imgclf-bench-jpegs", n)]
    rows = {}
    for backbone in BACKBONES:
        for precision in ("float32", "bfloat16"):
            print(f"{backbone} {precision}...", file=sys.stderr, flush=True)
            rows[f"{backbone} {precision}"] = child(["throughput", backbone, precision, "224", "32", "1", "1", *paths])
            save("precision", {"images": n, "jpeg_side": 512, "size": 224, "batch": 32, "rows": rows})
    print("| backbone | precision | forward pass img/s | features@ img/s | ratio (≥0.85) |\n|---|---|---|---|---|")
    for key, r in rows.items():
        print(f"| {' | '.join(key.split())} | {r['bare_ips']} | {r['features_ips']} | {r['ratio']:.2f} |")


def tuning_part(n: int) -> None:
    paths = [str(p) for p in jpegs(Path(tempfile.gettempdir()) / "imgclf-bench-jpegs", n)]
    done = json.loads(RESULTS.read_text()).get("tuning", {}).get("rows", []) if RESULTS.is_file() else []
    rows = list(done)  # resume: settings measured before are kept, not measured again
    cases = [("vgg16", "bfloat16"), ("mobilenet", "float32")]
    settings = [  # (batch size, loader threads, TensorFlow threads, JPEG scaling): the defaults first
        (32, 1, None, True), (32, 1, None, False), (16, 1, None, True), (64, 1, None, True), (32, 2, None, True),
        (32, 1, "1", True), (32, 1, "2x1", True),
    ]  # fmt: skip
    fields = ("backbone", "precision", "batch", "loader_threads", "tf_threads", "jpeg_scaling")
    measured = {tuple(r[f] for f in fields) for r in done}
    for backbone, precision in cases:
        for batch, threads, tf_threads, jpeg in settings:
            note = tf_threads or "default"
            if (backbone, precision, batch, threads, note, jpeg) in measured:
                continue
            print(f"{backbone} {precision} batch {batch} loader {threads} tf {note} jpeg {jpeg}...", file=sys.stderr)
            extra = ["--tf-threads", tf_threads] if tf_threads else []  # options before the positional paths
            args = [backbone, precision, "224", str(batch), str(threads), str(int(jpeg))]
            r = child([*extra, "throughput", *args, *paths])
            values = (backbone, precision, batch, threads, note, jpeg)
            rows.append({**dict(zip(fields, values, strict=True)), **r})
            save("tuning", {"images": n, "size": 224, "rows": rows})
    print("| backbone | precision | batch | loader threads | TF threads | JPEG scaling | forward img/s "
          "| features@ img/s | ratio |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(
            f"| {r['backbone']} | {r['precision']} | {r['batch']} | {r['loader_threads']} | {r['tf_threads']} | "
            f"{'on' if r['jpeg_scaling'] else 'off'} | {r['bare_ips']} | {r['features_ips']} | {r['ratio']:.2f} |"
        )


def train_child(path: str, mode: str, epochs: int) -> dict:
    """Fit the head on a synthetic feature file as train@ does (streamed), or from an in-memory array (the
    previous train@). Peak RSS (VmHWM) of this process, seconds per epoch after the first (tracing)."""
    import keras
    import numpy as np

    from imgclf.features.rows import RowReader
    from imgclf.features.store import FeatureBatches
    from imgclf.head.model import build_attention_head
    from imgclf.head.training import compile_model

    reader = RowReader(path)
    n = len(reader)
    labels = np.arange(n) % 4
    train, val = np.arange(n - n // 10), np.arange(n - n // 10, n)
    head = build_attention_head(reader.shape[1:], 4, feature_mean=np.zeros(512), feature_variance=np.ones(512))
    compile_model(head, 3e-4)
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    if mode == "stream":
        fit_args = {"x": FeatureBatches([(reader, train, labels[train])], 32, shuffle_seed=0),
                    "validation_data": FeatureBatches([(reader, val, labels[val])], 32)}  # fmt: skip
    else:
        x = np.load(path)  # what train@ held before: every training row in memory (views below, no copy)
        cut = n - n // 10
        fit_args = {"x": x[:cut], "y": labels[:cut], "validation_data": (x[cut:], labels[cut:]), "batch_size": 32}
    head.fit(**fit_args, epochs=epochs, verbose=0, callbacks=[Timer()])
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {"peak_rss_mb": round(peak_kb / 1024), "epoch_s": round(statistics.median(times[1:]), 2)}


def train_memory_part(sizes: list[int], epochs: int) -> None:
    import numpy as np

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"features-{n}.npy"
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 7, 7, 512))
            rng = np.random.default_rng(n)
            for i in range(0, n, 1000):
                array[i : i + 1000] = rng.random((min(1000, n - i), 7, 7, 512), dtype=np.float32)
            array.flush()
            del array
            for mode in ("stream", "memory"):
                print(f"{n} rows, {mode}...", file=sys.stderr, flush=True)
                rows[f"{n} {mode}"] = child(["train", str(path), mode, str(epochs)])
                save("train_memory", {"shape": [7, 7, 512], "epochs": epochs, "rows": rows})
    print("| rows | file GB | streamed: peak RSS MB | s/epoch | in memory: peak RSS MB | s/epoch |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        s, m = rows[f"{n} stream"], rows[f"{n} memory"]
        gb = n * 7 * 7 * 512 * 4 / 1e9
        print(f"| {n} | {gb:.1f} | {s['peak_rss_mb']} | {s['epoch_s']} | {m['peak_rss_mb']} | {m['epoch_s']} |")


def cached_vs_fit_child(n: int, epochs: int, paths: list[str]) -> dict:
    """The pipeline (features once in bfloat16, then the head on cached features) against the notebook's way
    (the frozen bfloat16 backbone inside fit, every epoch), same images, head, epochs and batch size."""
    import numpy as np

    from imgclf.core.repro import seed_everything
    from imgclf.data.images import load_image
    from imgclf.features.backbone_pass import iter_features
    from imgclf.head.model import build_attention_head, build_end_to_end
    from imgclf.head.training import compile_model

    seed_everything(0)
    labels = np.arange(n) % 4
    model = extractor("vgg16", 224, "bfloat16")
    start = time.perf_counter()
    features = np.concatenate(list(iter_features(model, [Path(p) for p in paths], 224, 32)))
    mid = time.perf_counter()
    stats = {"feature_mean": features.mean((0, 1, 2)), "feature_variance": features.var((0, 1, 2))}
    head = build_attention_head(features.shape[1:], 4, **stats)
    compile_model(head, 3e-4)
    head.fit(features, labels, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    cached, features_s = time.perf_counter() - start, mid - start
    images = np.stack([load_image(p, 224) for p in paths])  # in memory: the baseline pays for compute only
    full = build_end_to_end(model, build_attention_head(features.shape[1:], 4, **stats), "baseline")
    compile_model(full, 3e-4)
    start = time.perf_counter()
    full.fit(images, labels, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    baseline = time.perf_counter() - start
    return {
        "cached_s": round(cached, 1),
        "features_s": round(features_s, 1),
        "baseline_s": round(baseline, 1),
        "speedup": round(baseline / cached, 1),
    }


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("what")
        parser.add_argument("args", nargs="*")
        parser.add_argument("--tf-threads")
        args = parser.parse_args(sys.argv[2:])
        if args.tf_threads:  # "1": one intra-op thread; "2x1": two intra-op threads, one inter-op
            import tensorflow as tf

            intra, _, inter = args.tf_threads.partition("x")
            tf.config.threading.set_intra_op_parallelism_threads(int(intra))
            if inter:
                tf.config.threading.set_inter_op_parallelism_threads(int(inter))
        a = args.args
        if args.what == "throughput":
            out = throughput(a[0], a[1], [Path(p) for p in a[6:]], int(a[2]), int(a[3]), int(a[4]), a[5] == "1")
        elif args.what == "train":
            out = train_child(a[0], a[1], int(a[2]))
        else:
            out = cached_vs_fit_child(int(a[0]), int(a[1]), a[2:])
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["precision", "tuning", "train-memory", "cached-vs-fit"])
    parser.add_argument("--images", type=int, default=160, help="images per throughput measurement")
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if args.part == "precision":
        precision_part(args.images)
    elif args.part == "tuning":
        tuning_part(args.images)
    elif args.part == "train-memory":
        train_memory_part(args.rows, args.epochs)
    else:
        paths = [str(p) for p in jpegs(Path(tempfile.gettempdir()) / "imgclf-bench-jpegs", 512)]
        result = child(["cached", "512", "10", *paths])
        save("cached_vs_fit", {"backbone": "vgg16", "precision": "bfloat16", "size": 224, "images": 512,
                               "epochs": 10, **result})  # fmt: skip
        print(json.dumps(result))


if __name__ == "__main__":
    main()
