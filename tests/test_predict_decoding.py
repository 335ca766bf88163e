"""predict decodes each image once, whatever the number of models, and never stops on a file that cannot be read
(even one that breaks between two reads): no TensorFlow needed, the models are stand-ins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset

from imgclf.data.images import ImageSkip
from imgclf.results import predict


class StandIn:
    """What classify needs of a model: one (B, S, S, 3) batch in, probabilities (B, K) out."""

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return np.full((len(batch), 2), 0.5)


def classifier(name: str) -> predict.Classifier:
    return predict.Classifier(name, StandIn(), StandIn(), {"backbone": name, "classes": ["a", "b"], "image_size": 32})


@pytest.mark.parametrize("models", [1, 3])
def test_each_image_is_decoded_once_and_a_file_that_cannot_be_read_becomes_an_error_row(
    tmp_path: Path, monkeypatch, models: int
) -> None:
    root = make_dataset(tmp_path / "d", {"a": 3, "b": 2})
    paths = sorted(root.rglob("*.png"))
    decoded: list[Path] = []
    real = predict.try_load_image.__globals__["load_image"]

    def counting_load(path, size, recipe):
        decoded.append(Path(path))
        if Path(path).name == "b_001.png":  # listed, then unreadable when its batch is decoded
            raise ImageSkip("truncated or corrupt image (changed since it was listed)")
        return real(path, size, recipe)

    monkeypatch.setitem(predict.try_load_image.__globals__, "load_image", counting_load)
    table = predict.classify([classifier(f"m{i}") for i in range(models)], paths, batch_size=2)
    assert sorted(decoded) == sorted(paths)  # once each, for 1 model or 3 (e1ae736: 1 + models times)
    bad = table[table.path.str.endswith("b_001.png")].iloc[0]
    assert bad.predicted == "" and "changed since it was listed" in bad.error
    assert (table.error == "").sum() == len(paths) - 1
