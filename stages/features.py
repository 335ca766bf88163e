"""features@<backbone>: run the frozen backbone once per unique image; cache the feature maps.

python stages/features.py vgg16 --split-dir data/split --train data/balanced/train.csv --out-dir data/features/vgg16
"""

import argparse
from pathlib import Path

import pandas as pd

from imgclf.backbones import build_backbone, get_backbone
from imgclf.errors import log, stage_main
from imgclf.features import compute_features, unique_images
from imgclf.params import load_params
from imgclf.repro import seed_everything


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    parser.add_argument("--split-dir", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    features = params["features"]
    backbone = get_backbone(args.backbone)
    seed_everything(params["base"]["seed"])

    from imgclf.model import build_extractor

    frames = [pd.read_csv(args.train, keep_default_na=False)]
    frames += [pd.read_csv(args.split_dir / f"{name}.csv", keep_default_na=False) for name in ("val", "test")]
    images = unique_images(frames)
    model, weights = build_backbone(backbone, features["image_size"], features["weights"])
    extractor = build_extractor(model, backbone.name, features["image_size"], features["preprocessing"])
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
            **weights,
        },
        background=tuple(params["data"]["background"]),
    )
    log.info(
        "features@%s: %d unique images (%d list rows) -> %s in %.1f s (%.1f images/s)",
        backbone.name,
        info["images"],
        sum(len(f) for f in frames),
        tuple(info["feature_shape"]),
        info["seconds"],
        info["images_per_second"] or 0,
    )


if __name__ == "__main__":
    main()
