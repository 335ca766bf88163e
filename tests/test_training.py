"""Fine-tuning unfreezes exactly the top layers, keeps BatchNorm frozen, and changes only what it unfroze."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from helpers import make_dataset

from imgclf.features.backbones import build_backbone, get_backbone
from imgclf.features.extractor import backbone_of, build_extractor
from imgclf.head.model import build_attention_head, build_end_to_end
from imgclf.head.training import fine_tune


def test_fine_tune_changes_only_the_unfrozen_top_layers(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", {"a": 8, "b": 8}, size=71, rgb=True)
    frame = pd.DataFrame({"path": [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.png"))]})
    frame["label"] = frame.path.str.split("/").str[0]
    # Xception: it has BatchNorm, and its random-init activations are large enough for gradients to move
    # weights (MobileNet's, ~1e-20, are not).
    model, _ = build_backbone(get_backbone("xception"), 71, "none")
    extractor = build_extractor(model, "xception", 71, "backbone")
    head = build_attention_head(tuple(extractor.output.shape[1:]), 2, heads=1, key_dim=4, dense_units=8)
    full = build_end_to_end(extractor, head, "xception_classifier")
    backbone = backbone_of(extractor)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone.layers}

    # lr 1e-2: the validation loss jumps about, so the best epoch is seldom the last.
    params = {"layers": 3, "lr": 1e-2, "epochs": 4, "batch_size": 8,
              "early_stopping": {"monitor": "val_loss", "patience": 4}}  # fmt: skip
    result = fine_tune(full, backbone, frame, frame, root, ["a", "b"], 71, params, seed=0)

    # The model kept is the best fine-tuning epoch's (restored), and the result says which epoch that was.
    assert 1 <= result["best_epoch"] <= result["epochs_run"] == 4
    best_loss = min(result["history"]["val_loss"])
    assert result["history"]["val_loss"][result["best_epoch"] - 1] == best_loss
    from imgclf.head.training import ImageBatches

    paths, labels = [root / p for p in frame.path], frame.label.map({"a": 0, "b": 1}).to_numpy()
    loss_now = full.evaluate(ImageBatches(paths, labels, 71, 8), verbose=0)[0]
    assert abs(loss_now - best_loss) < 1e-4 * max(1.0, best_loss), (loss_now, result["history"]["val_loss"])

    # the top 3: block14_sepconv2, its BatchNorm (kept frozen), its activation
    assert result["unfrozen_layers"] == ["block14_sepconv2"]
    changed = {
        name
        for name, weights in before.items()
        if any(not np.array_equal(w, v) for w, v in zip(weights, backbone.get_layer(name).get_weights(), strict=True))
    }
    assert changed == {"block14_sepconv2"}  # BatchNorm statistics and everything below stay as they were
    assert not backbone.trainable_weights  # frozen again afterwards
