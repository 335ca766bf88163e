"""Is another runtime faster for the backbone pass? TensorFlow (float32, bfloat16) against ONNX Runtime and
LiteRT (float32), on the same images, machine and batch size.

    python bench/runtimes.py [--backbones vgg16 mobilenet] [--size 224] [--images 48] [--batch 16]

Each backbone is built as features@ builds its extractor (the backbone's own preprocessing inside, uint8 images
in, feature map out; random weights: the speed of a convolution does not depend on its weights), exported
with `imgclf.deploy.export.write_model` and timed: one warm-up batch, then every image once, best of two
rounds. The same uint8 images go through every runtime; the feature maps of each export are compared with
TensorFlow float32's (max |difference| relative to the largest feature). Writes bench/results-runtimes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model  # bench/machine.py (a script's own folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def extractor(name: str, size: int, precision: str):
    import keras

    from imgclf.features.backbones import build_backbone, get_backbone
    from imgclf.features.device import dtype_policy
    from imgclf.features.extractor import build_extractor

    with dtype_policy(precision):
        backbone, _ = build_backbone(get_backbone(name), size, "none")
    inner = build_extractor(backbone, name, size, "backbone")
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    pixels = keras.layers.Lambda(lambda x: keras.ops.cast(x, "float32"), name="to_float32")(image)
    return keras.Model(image, inner(pixels), name=f"{name}_{precision}")


def timed(run, images: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Images per second (best of two rounds after one warm-up batch) and the outputs of the last round."""
    run(images[:batch])
    best, outputs = 0.0, None
    for _ in range(2):
        start = time.perf_counter()
        outputs = np.concatenate([np.asarray(run(images[i : i + batch])) for i in range(0, len(images), batch)])
        best = max(best, len(images) / (time.perf_counter() - start))
    return best, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "mobilenet"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results-runtimes.json")
    args = parser.parse_args()

    import tensorflow as tf

    from imgclf.deploy.export import runtime_of, write_model
    from imgclf.features.device import cpu_flags

    tf.get_logger().setLevel("ERROR")
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    results: dict[str, dict] = {}
    for name in args.backbones:
        row: dict[str, dict] = {}
        model = extractor(name, args.size, "float32")
        speed, reference = timed(lambda b, m=model: m.predict_on_batch(b), images, args.batch)
        row["tensorflow_float32"] = {"images_per_s": round(speed, 2)}
        scale = float(np.abs(reference).max()) or 1.0
        model16 = extractor(name, args.size, "bfloat16")
        model16.set_weights(model.get_weights())
        speed, out = timed(lambda b, m=model16: m.predict_on_batch(b), images, args.batch)
        row["tensorflow_bfloat16"] = {
            "images_per_s": round(speed, 2),
            "max_rel_difference": float(f"{np.abs(out - reference).max() / scale:.3g}"),
            "note": None if bf16 else "no AVX-512 BF16 / AMX on this CPU: emulated, not a hardware path",
        }
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("onnx", "tflite"):
                path = Path(tmp) / f"{name}.{fmt}"
                start = time.perf_counter()
                write_model(model, fmt, path)
                converted = time.perf_counter() - start
                runtime, run = runtime_of(fmt, path)
                speed, out = timed(run, images, args.batch)
                row[f"{fmt}_float32"] = {
                    "runtime": runtime,
                    "images_per_s": round(speed, 2),
                    "max_rel_difference": float(f"{np.abs(out - reference).max() / scale:.3g}"),
                    "convert_s": round(converted, 1),
                    "size_mb": round(path.stat().st_size / 1e6, 1),
                }
        results[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    report = {
        "command": "python bench/runtimes.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "bf16_hardware": bf16},
        "size": args.size,
        "images": args.images,
        "batch": args.batch,
        "threads": "each runtime's default (all cores)",
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
