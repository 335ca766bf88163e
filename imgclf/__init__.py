"""imgclf: image classification by transfer learning, reproducible end to end with DVC."""

__version__ = "0.1.0"
