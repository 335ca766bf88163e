"""The list of images a backbone pass computes: one row per content, shared by split (images.csv) and augment@
(its training images). A module of its own so that neither stage depends on the other's code."""

from __future__ import annotations

import pandas as pd


def unique_images(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per unique content (sha256), first path in sorted order: the images a backbone pass computes."""
    rows = pd.concat([f[["sha256", "path"]] for f in frames], ignore_index=True)
    return rows.sort_values(["sha256", "path"]).drop_duplicates("sha256").reset_index(drop=True)
