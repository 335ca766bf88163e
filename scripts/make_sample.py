"""Build the bundled sample dataset in data/sample/ from Debian's Fashion-MNIST files.

Fashion-MNIST (c) 2017 Zalando SE, MIT licence; Debian package `dataset-fashion-mnist`
(`apt-get install dataset-fashion-mnist`). Four classes are drawn from the *training* file
with a fixed seed and deliberately imbalanced, so that balancing has something to do.

    python scripts/make_sample.py [--source /usr/share/datasets/fashion-mnist] [--out data/sample]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# Fashion-MNIST label id -> folder name, and how many images of it to draw.
CLASSES = {3: ("dress", 300), 4: ("coat", 150), 7: ("sneaker", 90), 9: ("ankle_boot", 60)}
SEED = 20261126


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST container format), gzip-compressed."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, _, dtype_code, ndim = struct.unpack(">BBBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned bytes (0x08), got 0x{dtype_code:02x}")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    args = parser.parse_args()

    images = read_idx(args.source / "train-images-idx3-ubyte.gz")  # (60000, 28, 28)
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz")  # (60000,)
    rng = np.random.default_rng(SEED)
    for label_id, (name, count) in CLASSES.items():
        folder = args.out / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        candidates = np.flatnonzero(labels == label_id)
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        for index in chosen:
            Image.fromarray(images[index]).save(folder / f"fmnist_train_{index:05d}.png")
        print(f"{name}: {count} images")


if __name__ == "__main__":
    main()
