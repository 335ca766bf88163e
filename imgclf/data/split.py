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


def _has_groups(ok: pd.DataFrame) -> bool:
    """Whether any group holds more than one content (near-copies or subjects joined by prepare)."""
    return "group" in ok and bool((ok.groupby(group_key(ok))["sha256"].nunique() > 1).any())


def held_out(manifest: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The kept rows that split_manifest put in no split (copies or near-copies of a provided test or
    validation image, found in another split's folder), with the reason."""
    ok = manifest[manifest.status == "ok"]
    placed = set().union(*(set(df.path) for df in splits.values()))
    rows = ok[~ok.path.isin(placed)].copy()
    if "linked_to" in rows:
        linked_test = rows.linked_to.str.contains("test", regex=False).tolist()
    else:
        linked_test = group_key(rows).isin(set(group_key(splits["test"]))).tolist()
    rows["reason"] = [
        f"a copy, a confirmed near-copy or the same subject as an image in the provided "
        f"{'test' if test else 'validation'} folder"
        for test in linked_test
    ]
    return rows.sort_values("path").reset_index(drop=True)


def _allocate(sizes: list[int], order: np.ndarray, fractions: dict[str, float]) -> dict[str, list[int]]:
    """Whole groups (indices into `sizes`) per split, aiming at each share of the images (not of the groups).

    Groups are taken in `order` (a seeded permutation): test first, then validation, each taking a group while
    that brings its image count strictly closer to its target (round(share x images), at least 1), and while
    enough groups remain for the splits after it (one each, train last). A group at least twice a target is
    thus never taken by the loop: a dominant patient stays in train. A split the loop left empty takes the
    smallest group left (the first in order among equals). With one image per group this is exactly
    round(share x n) groups, the allocation from before groups existed."""
    total = sum(sizes)
    remaining = [int(i) for i in order]
    names = [name for name in ("test", "val") if name in fractions]
    out: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        later = len(names) - position  # the splits after this one, train included: one group each
        target = max(1, round(total * fractions[name]))
        count, chosen, rest = 0, [], []
        for i in remaining:
            left_after = len(remaining) - len(chosen) - 1  # groups not in this split if i joins it
            closer = abs(count + sizes[i] - target) < abs(count - target)
            if count < target and closer and left_after >= later:
                chosen.append(i)
                count += sizes[i]
            else:
                rest.append(i)
        if not chosen and len(rest) > later:
            smallest = min(rest, key=lambda i: sizes[i])
            chosen, rest = [smallest], [i for i in rest if i != smallest]
        out[name], remaining = chosen, rest
    out["train"] = remaining
    return out


def group_counts(splits: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Groups (subjects, near-copies and identical content kept together) per split and per class."""
    out: dict[str, dict[str, int]] = {}
    for name, frame in splits.items():
        key = group_key(frame)
        out[name] = {str(label): int(key[frame.label == label].nunique()) for label in sorted(set(frame.label))}
    return out


def spanning_groups(manifest: pd.DataFrame) -> pd.DataFrame:
    """Kept rows of groups found in more than one provided split folder (e.g. a patient in both Training and
    Testing): the provided folders win, so split holds such training rows out; this lists every row."""
    ok = manifest[(manifest.status == "ok") & (manifest.provided_split != "")]
    key = group_key(ok)
    folders = ok.groupby(key)["provided_split"].nunique()
    spanning = set(folders.index[folders > 1])
    return ok[key.isin(spanning)].sort_values("path").reset_index(drop=True)


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
        assigned[ok.provided_split == "test"] = "test"
        if "linked_to" in ok:
            # prepare's links, pair by pair: same content, a confirmed near-copy, the same subject
            to_test = ok.linked_to.str.contains("test", regex=False)
            to_val = ok.linked_to.str.contains("val", regex=False)
        else:  # a manifest without links: whole groups
            to_test = key.isin(set(key[ok.provided_split == "test"]))
            to_val = key.isin(set(key[ok.provided_split == "val"]))
        assigned[(ok.provided_split == "val") & ~to_test] = "val"
        assigned[(assigned == "") & (to_test | to_val)] = HELD_OUT  # copies of test/val images elsewhere
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
    # two classes, a patient with images of two classes) is counted and placed once, and no class loses a group
    # it was counted with. A group's size is its images of every label.
    pool = ok[assigned == ""]
    pool_key = key[assigned == ""]
    owner = pool.groupby(pool_key, sort=False)["label"].first()
    size = pool_key.value_counts()
    what = "group(s) (subjects, near-copies and identical images together)" if _has_groups(ok) else "unique image(s)"
    for label in sorted(set(owner)):
        groups = sorted(owner.index[owner == label])  # group ids are content hashes: the order needs no subject key
        if len(fractions) > 1 and len(groups) < needed:
            raise UserError(
                f"class {label!r} has {len(groups)} {what}; splitting with split.val={val} and "
                f"split.test={test} needs at least {needed} per class; add images, drop the class folder, "
                "or raise the ratios"
            )
        order = rng.permutation(len(groups))
        chosen_by_split = _allocate([int(size[g]) for g in groups], order, fractions)
        if not chosen_by_split["train"]:
            raise UserError(
                f"class {label!r} has {len(groups)} {what}: split.val={val} and split.test={test} leave "
                "none for training; add images or lower the ratios"
            )
        for name in ("test", "val", "train"):
            if name not in chosen_by_split:
                continue
            chosen = {groups[i] for i in chosen_by_split[name]}
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
