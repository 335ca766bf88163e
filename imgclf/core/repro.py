"""One seed for everything: Python, NumPy, Keras/TensorFlow, plus TensorFlow op determinism."""

from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed every generator a stage uses and make TensorFlow ops deterministic.

    With this, `dvc repro -f` on the same machine and versions gives the same numbers, bit for bit.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # GPUs: take memory as needed rather than all of it at start, so that stages and queued experiments can
    # share a card (read when TensorFlow first touches a GPU; a no-op without one).
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
