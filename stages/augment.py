"""augment@<backbone>: augmented variants of the training images, each through the backbone once, cached.

python -m stages.augment vgg16 --train data/split/train.csv --features data/features/vgg16 \
    --out-dir data/augmented/vgg16

`augment.copies` variants of every unique training image (none of validation or test), made with the very
extractor features@<bb> saved. A stage of its own so that changing `augment` reruns only this pass over the
training images, not the backbone pass over every image. With copies 0 it writes an empty set.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from imgclf.core.errors import log, stage_main
from imgclf.core.io import read_csv, read_json
from imgclf.core.repro import seed_everything
from imgclf.data.augment import AugmentParams, make_variant
from imgclf.data.imagelist import unique_images
from imgclf.data.images import ImageRecipe
from imgclf.features.backbone_pass import EXTRACTOR_FILE, EXTRACTOR_INFO_FILE, write_empty_features
from imgclf.features.reuse import compute_features
from imgclf.params import load_params


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    for name in ("--train", "--features", "--out-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    seed = params["base"]["seed"]
    augment = AugmentParams.from_params(params["augment"])
    features_info = read_json(args.features / EXTRACTOR_INFO_FILE)  # what the extractor is (not its images)
    if augment.copies == 0:  # nothing to compute (and no TensorFlow to start): an empty set, whatever the strengths
        write_empty_features(args.out_dir, features_info["feature_shape"], {"backbone": args.backbone, "copies": 0})
        log.info("augment@%s: augment.copies is 0, no variants", args.backbone)
        return
    seed_everything(seed)

    from imgclf.features.extractor import load_extractor

    train = unique_images([read_csv(args.train)])
    # Row i of the output: variant k of training image j, for j in order and k = 1..copies.
    rows = train.loc[np.repeat(np.arange(len(train)), augment.copies)].reset_index(drop=True)
    rows = rows.assign(variant=np.tile(np.arange(1, augment.copies + 1), len(train)))
    extractor = load_extractor(str(args.features / EXTRACTOR_FILE))
    start = time.perf_counter()
    info = compute_features(
        extractor,
        rows[["sha256", "path", "variant"]],
        root=params["data"]["root"],
        out_dir=args.out_dir,
        image_size=features_info["image_size"],
        batch_size=params["features"]["batch_size"],
        info={
            "backbone": args.backbone,
            "copies": augment.copies,
            "augment": augment.to_dict(),
            "seed": seed,
            "precision": features_info.get("precision", "float32"),  # the saved extractor's: the same pass
        },
        recipe=ImageRecipe.from_params(params["data"]),
        transform=lambda i, image: make_variant(image, seed, rows.sha256[i], int(rows.variant[i]), augment),
        desc=f"augment@{args.backbone}",
        save_extractor=False,  # the one in the features directory made these
        cache=params["features"]["cache"],
        # a variant's pixels: the strengths, the seed and the image (its sha256 and number k, in the item); not
        # the number of copies, so raising it computes only the new variants
        cache_record={"augment": {k: v for k, v in augment.to_dict().items() if k != "copies"}, "seed": seed},
    )
    log.info(
        "augment@%s: %d variants (%d unique training images x %d copies) in %.1f s: %d computed, %d reused from %s",
        args.backbone, len(rows), len(train), augment.copies, time.perf_counter() - start, info["computed"],
        info["reused"], params["features"]["cache"] or "no cache (features.cache: null)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
