"""Split the kept images into train, validation and test (stratified; each group in one split; provided
folders kept as given), and balance the training split.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from imgclf.core.errors import UserError

SPLITS = ("train", "val", "test")


HELD_OUT = "held_out"


def group_key(ok: pd.DataFrame) -> pd.Series:
    """What split keeps together: the group prepare formed (near-copies), else the content hash."""
    return ok.group.where(ok.group != "", ok.sha256) if "group" in ok else ok.sha256


def held_out(manifest: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The kept rows that split_manifest put in no split (copies or near-copies of a provided test or
    validation image, found in another split's folder), with the reason."""
    ok = manifest[manifest.status == "ok"]
    placed = set().union(*(set(df.path) for df in splits.values()))
    rows = ok[~ok.path.isin(placed)].copy()
    key, test_keys = group_key(rows), set(group_key(splits["test"]))
    rows["reason"] = [
        f"a copy or near-copy of an image in the provided {'test' if k in test_keys else 'validation'} folder"
        for k in key
    ]
    return rows.sort_values("path").reset_index(drop=True)


def _allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Whole counts per split for n groups: each split >= 1, val/test rounded, train takes the rest."""
    counts = {name: max(1, round(n * frac)) for name, frac in fractions.items() if name != "train"}
    counts["train"] = n - sum(counts.values())
    return counts


def split_manifest(
    manifest: pd.DataFrame, val: float, test: float, seed: int, use_provided_splits: bool = True
) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test split of the kept rows; each group (identical content, and near-copies
    when prepare grouped them) lies in exactly one split.

    With provided split folders and use_provided_splits, the provided test folder is the test split exactly
    as given, and the provided validation folder is the validation split less any copy of a test image (so
    early stopping never sees one): results stay comparable with the official split. A copy or near-copy of
    a test (validation) image elsewhere would leak it into training; such rows are held out of every split,
    not moved into test. `held_out` lists them. The rest is split per class with the ratios (as fractions
    of what is being split).
    """
    ok = manifest[manifest.status == "ok"].reset_index(drop=True)
    key = group_key(ok)
    assigned = pd.Series("", index=ok.index, dtype=object)
    if use_provided_splits:
        test_keys = set(key[ok.provided_split == "test"])
        assigned[ok.provided_split == "test"] = "test"
        assigned[(ok.provided_split == "val") & ~key.isin(test_keys)] = "val"
        held = set(key[assigned != ""])
        assigned[(assigned == "") & key.isin(held)] = HELD_OUT  # copies of test/val images elsewhere
    fixed = set(assigned[assigned.isin(["val", "test"])])
    fractions = {"train": 1.0}
    if "val" not in fixed:
        fractions["val"] = val
    if "test" not in fixed:
        fractions["test"] = test
    rng = np.random.default_rng(seed)
    others = [f for name, f in fractions.items() if name != "train"]
    needed = max(len(fractions), math.ceil(0.5 / min(others))) if others else 1
    # Each group belongs to the label of its first row, so a group spanning labels (near-copies filed under
    # two classes) is counted and placed once, and no class loses a group it was counted with.
    pool = ok[assigned == ""]
    owner = pool.groupby(key[assigned == ""], sort=False)["label"].first()
    for label in sorted(set(owner)):
        groups = sorted(owner.index[owner == label])
        if len(fractions) > 1 and len(groups) < needed:
            raise UserError(
                f"class {label!r} has {len(groups)} unique image(s); splitting with split.val={val} and "
                f"split.test={test} needs at least {needed} per class; add images, drop the class folder, "
                "or raise the ratios"
            )
        order = rng.permutation(len(groups))
        counts = _allocate(len(groups), fractions)
        if counts["train"] < 1:
            raise UserError(
                f"class {label!r} has {len(groups)} unique image(s): split.val={val} and split.test={test} leave "
                "none for training; add images or lower the ratios"
            )
        start = 0
        for name in ("test", "val", "train"):
            if name not in counts:
                continue
            chosen = {groups[i] for i in order[start : start + counts[name]]}
            start += counts[name]
            assigned[(assigned == "") & key.isin(chosen)] = name  # a group spanning labels moves whole
    ok = ok.assign(split=assigned)
    out = {}
    for name in SPLITS:
        part = ok[ok.split == name].drop(columns=["split"]).sort_values("path").reset_index(drop=True)
        if part.empty:
            raise UserError(f"the {name} split is empty; add images or change split.val / split.test")
        out[name] = part
    for name in ("val", "test"):
        missing = sorted(set(out[name].label) - set(out["train"].label))
        if missing:
            raise UserError(
                f"class(es) {', '.join(map(repr, missing))} appear in {name} but not in train; add training images "
                f"of {'them' if len(missing) > 1 else 'it'}, or remove them from the {name} folder"
            )
    return out


def balance_train(train: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    """Oversample the training split so every class has as many rows as the largest (train only)."""
    if method == "none":
        return train.copy()
    from imblearn.over_sampling import RandomOverSampler

    sampler = RandomOverSampler(random_state=seed)
    index = np.arange(len(train)).reshape(-1, 1)
    resampled, _ = sampler.fit_resample(index, train.label.to_numpy())
    return train.iloc[resampled.ravel()].reset_index(drop=True)
