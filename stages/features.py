"""features@<backbone>: run the frozen backbone once per unique image; cache the feature maps.

python -m stages.features vgg16 --images data/split/images.csv --out-dir data/features/vgg16

It reads the list of unique images that split writes (sha256 and path of every image in train, val and
test): that, not the data folder as a whole, is what the backbone pass depends on. A file added to the
folder, a change of the split ratios or of balancing leave the list, and so the features, unchanged.
"""

import argparse
import time
from pathlib import Path

from imgclf.core.errors import log, stage_main
from imgclf.core.io import read_csv
from imgclf.core.repro import seed_everything
from imgclf.data.images import ImageRecipe
from imgclf.features.backbones import build_backbone, get_backbone
from imgclf.features.device import check_precision, dtype_policy, platform_record, precision_for
from imgclf.features.reuse import compute_features
from imgclf.params import load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    features = params["features"]
    backbone = get_backbone(args.backbone)
    seed_everything(params["base"]["seed"])

    from imgclf.features.extractor import build_extractor

    if features["engine"] == "ray":  # Ray is imported (and needed) only then
        from imgclf.features.engine_ray import import_ray, ray_engine, shutdown

        import_ray(features["ray"]["address"])  # not installed: say so before the backbone is built

    images = read_csv(args.images)
    precision = precision_for(features, backbone.name)
    on_ray = features["engine"] == "ray"
    if not on_ray:  # on Ray, each worker checks its own machine (features/engine_ray.py: BatchModel.check_device)
        check_precision(precision, backbone.name)
    with dtype_policy(precision):  # the backbone's layers compute in this precision (variables stay float32)
        model, weights = build_backbone(backbone, features["image_size"], features["weights"])
    extractor = build_extractor(model, backbone.name, features["image_size"], features["preprocessing"])
    start = time.perf_counter()
    try:
        info = compute_features(
            extractor,
            images,
            root=params["data"]["root"],
            out_dir=args.out_dir,
            image_size=features["image_size"],
            batch_size=features["batch_size"],
            info={
                "backbone": backbone.name,
                "image_size": features["image_size"],
                "preprocessing": features["preprocessing"],
                "precision": precision,
                # The driver's machine; with the Ray engine the workers' records key the stored outputs only.
                "platform": platform_record(),
                **weights,
            },
            recipe=ImageRecipe.from_params(params["data"]),
            engine=ray_engine(features["ray"]) if on_ray else None,
            cache=features["cache"],
            # Ray workers' outputs are keyed by what they were given, and each by its own machine (reuse.py)
            cache_record={"ray": {k: features["ray"][k] for k in ("address", "cpus_per_worker", "gpus_per_worker")}}
            if on_ray
            else None,
        )
    finally:
        if on_ray:
            shutdown()
    where = f"ray at {features['ray']['address']}, {features['ray']['workers']} workers" if on_ray else "this process"
    where = where if info["computed"] else "nothing to compute"
    seconds = time.perf_counter() - start
    log.info(
        "features@%s: %d images (the unique images of train, val and test) -> %s in %.1f s: %d computed "
        "(%.1f images/s, %s, %s), %d reused from %s",
        backbone.name, info["images"], tuple(info["feature_shape"]), seconds, info["computed"],
        info["computed"] / seconds if seconds > 0 else 0.0, precision, where, info["reused"],
        features["cache"] or "no cache (features.cache: null)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
