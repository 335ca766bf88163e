"""Figures written as PNG beside the DVC plot data, so every result can be seen offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from imgclf.images import load_image
from imgclf.io import save_figure


def class_count_plot(counts: dict[str, int], path: str | Path, title: str = "Images per class") -> None:
    frame = pd.DataFrame({"label": list(counts), "count": list(counts.values())})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(counts)), 4))
    sns.barplot(data=frame, x="label", y="count", hue="label", palette="viridis", legend=False, ax=ax)
    for container in ax.containers:
        ax.bar_label(container)
    ax.set(title=title, xlabel="class", ylabel="images")
    save_figure(fig, path)


def class_pie_chart(counts: dict[str, int], path: str | Path, title: str = "Class share") -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    colors = sns.color_palette("viridis", len(counts))
    ax.pie(list(counts.values()), labels=list(counts), autopct="%1.1f%%", startangle=90, colors=colors)
    ax.set_title(title)
    save_figure(fig, path)


def sample_grid(
    frame: pd.DataFrame, root: str | Path, path: str | Path, per_class: int, seed: int, image_size: int = 96
) -> None:
    """A grid of `per_class` randomly chosen (seeded) images for each class, one row per class."""
    labels = sorted(set(frame.label))
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(labels), per_class, figsize=(1.6 * per_class, 1.7 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        rows = frame[frame.label == label].sort_values("path")
        chosen = rows.iloc[rng.permutation(len(rows))[:per_class]]
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(chosen):
                image = load_image(Path(root) / chosen.iloc[c].path, image_size)
                ax.imshow(image.astype(np.uint8))
            if c == 0:
                ax.set_title(label, loc="left", fontsize=10)
    fig.suptitle("Sample images per class")
    save_figure(fig, path)


def history_plot(history: dict[str, list[float]], path: str | Path, title: str) -> None:
    """Accuracy and loss per epoch, train and validation side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(epochs, history[metric], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        ax.set(title=f"{title}: {metric}", xlabel="epoch", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def confusion_heatmap(matrix: np.ndarray, classes: list[str], path: str | Path, title: str) -> None:
    """Counts and row-normalised (recall per class) confusion matrices, class names on the axes."""
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.2 * len(classes), 0.9 * len(classes) + 2.5))
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    panels: list[tuple[Any, np.ndarray, str, str]] = [
        (axes[0], matrix, "d", "counts"),
        (axes[1], normalised, ".2f", "row-normalised"),
    ]
    for ax, data, fmt, name in panels:
        sns.heatmap(
            data, annot=True, fmt=fmt, cmap="Blues", cbar=False, xticklabels=classes, yticklabels=classes, ax=ax
        )
        ax.set(title=f"{title} ({name})", xlabel="predicted", ylabel="actual")
    save_figure(fig, path)
