"""Figures written as PNG beside the DVC plot data, so every result can be seen offline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from imgclf.core.io import save_figure
from imgclf.data.images import DEFAULT_RECIPE, ImageRecipe, load_image


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


WITHHELD = "pictures withheld (data.show_images): no image pixels in the committed plots"


def withheld_picture(path: str | Path, what: str) -> None:
    """In place of a picture of images (patients' pixels) when data.show_images withholds them: a note, so that the
    DVC output exists and a reviewer sees why it is empty. No pixel of any image is drawn."""
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{what}: withheld\n({WITHHELD})", ha="center", va="center", fontsize=10)
    save_figure(fig, path)


def sample_grid(
    frame: pd.DataFrame,
    root: str | Path,
    path: str | Path,
    per_class: int,
    seed: int,
    image_size: int = 96,
    recipe: ImageRecipe = DEFAULT_RECIPE,
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
                image = load_image(Path(root) / chosen.iloc[c].path, image_size, recipe)
                ax.imshow(image.astype(np.uint8))
            if c == 0:
                ax.set_title(label, loc="left", fontsize=10)
    fig.suptitle("Sample images per class")
    save_figure(fig, path)


def label_issue_grid(
    issues: pd.DataFrame,
    root: str | Path,
    path: str | Path,
    recipe: ImageRecipe = DEFAULT_RECIPE,
    note: str = "",
    image_size: int = 96,
    per_row: int = 8,
) -> None:
    """The top suspects of label_issues.csv, most suspicious first: each image with "given -> suggested" and
    its score (the out-of-fold probability of the given label). `note` replaces the grid when there is none."""
    if issues.empty:
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, note or "no label issues", ha="center", va="center", fontsize=10)
        save_figure(fig, path)
        return
    rows = math.ceil(len(issues) / per_row)
    cols = min(per_row, len(issues))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(issues.itertuples()):
        ax = axes[i // per_row][i % per_row]
        ax.imshow(load_image(Path(root) / row.path, image_size, recipe).astype(np.uint8))
        ax.set_title(f"#{row.rank} {row.given} ->\n{row.suggested} ({float(row.score):.2f})", fontsize=7)
    fig.suptitle("Suspected label errors (given -> suggested, p(given) out of fold)", fontsize=10)
    save_figure(fig, path)


def history_plot(history: dict[str, list[float]], path: str | Path, title: str, best_epoch: int | None = None) -> None:
    """Accuracy and loss per epoch, train and validation side by side; a dashed line at the restored epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(epochs, history[metric], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best (restored): {best_epoch}")
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


def attention_overlay(
    images: list[np.ndarray],
    maps: np.ndarray,
    titles: list[str],
    rows: int,
    path: str | Path,
    title: str,
    show_images: bool = True,
) -> None:
    """Each image with the head's attention over spatial positions (upsampled, bilinear) laid over it. Without
    `show_images` (data.show_images: false) the attention maps alone, on black: no pixel of the image."""
    from PIL import Image

    cols = max(1, int(np.ceil(len(images) / rows)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, amap, label) in enumerate(zip(images, maps, titles, strict=True)):
        ax = axes.flat[i]
        size = image.shape[:2][::-1]
        scaled = (amap - amap.min()) / (np.ptp(amap) or 1.0)
        heat = np.asarray(Image.fromarray(scaled.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
        if show_images:
            ax.imshow(image.astype(np.uint8))
            ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        else:
            ax.imshow(heat, cmap="jet", vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
    if show_images:
        fig.suptitle(title)
    else:
        fig.suptitle(f"{title}\n(attention only: {WITHHELD})", fontsize=9)
    save_figure(fig, path)


def explanation_panels(
    images: list[np.ndarray], maps: dict[str, np.ndarray], titles: list[str], path: str | Path, title: str
) -> None:
    """One row per image: the image | each method's map (e.g. attention, Grad-CAM) laid over it. One colour scale
    per method for the whole figure (each map divided by the largest value of its method in this figure), so that
    rows can be compared; the figure says so."""
    from PIL import Image

    names = list(maps)
    scale = {name: float(np.max(maps[name])) or 1.0 for name in names}
    fig, axes = plt.subplots(len(images), 1 + len(names), figsize=(2.2 * (1 + len(names)), 2.3 * len(images)),
                             squeeze=False)  # fmt: skip
    for r, (image, label) in enumerate(zip(images, titles, strict=True)):
        size = image.shape[:2][::-1]
        axes[r, 0].imshow(image.astype(np.uint8))
        axes[r, 0].set_title(label, fontsize=8)
        for c, name in enumerate(names, start=1):
            scaled = np.asarray(maps[name][r], np.float32) / scale[name]
            heat = np.asarray(Image.fromarray(scaled, mode="F").resize(size, Image.Resampling.BILINEAR))
            axes[r, c].imshow(image.astype(np.uint8))
            axes[r, c].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[r, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{title}\n(colours: each method's maps divided by its largest value in this figure, 0 to 1)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))  # the title's room, whatever the rows
    save_figure(fig, path)


def faithfulness_plot(scores: dict[str, Any], path: str | Path, title: str) -> None:
    """Deletion and insertion curves (explain.deletion_insertion) per method and for a random order, with their
    areas in the legend: no image pixels."""
    fractions = scores["fractions"]
    methods = [name for name in scores if isinstance(scores[name], dict) and "deletion" in scores[name]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher"), strict=True):
        for name, color in zip(methods, sns.color_palette("viridis", len(methods)), strict=True):
            curve = scores[name][kind]
            style = "--" if name == "random" else "-"
            ax.plot(fractions, curve["curve"], style, color=color, label=f"{name} (area {curve['auc']:.3f})")
        ax.set(xlabel=f"fraction of pixels {'removed' if kind == 'deletion' else 'revealed'}, most important first",
               title=f"{kind} ({better} area is better)", ylim=(0, 1.02))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("calibrated probability of the predicted class")
    fig.suptitle(title)
    save_figure(fig, path)


def comparison_plot(summary: pd.DataFrame, path: str | Path) -> None:
    """Accuracy and macro F1 per model, with their bootstrap intervals as error bars."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(summary) + 2.5), sharey=True)
    for ax, metric in zip(axes, ("accuracy", "macro_f1"), strict=True):
        values = summary[metric].to_numpy()
        err = np.abs(np.stack([summary[f"{metric}_low"], summary[f"{metric}_high"]]) - values)
        ax.barh(summary["model"], values, xerr=err, color=sns.color_palette("viridis", len(summary)), capsize=4)
        for y, v in enumerate(values):
            ax.text(0.01, y, f"{v:.3f}", va="center", color="white", fontsize=9)
        ax.set(xlim=(0, 1), title=f"test {metric} (with interval)", xlabel=metric)
        ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def reliability_diagram(
    curves: dict[str, list[dict[str, Any]]], path: str | Path, title: str, ece: dict[str, float] | None = None
) -> None:
    """Accuracy against mean confidence per bin (calibration.reliability_table), one line per curve (e.g.
    before and after calibration, or one per model), the diagonal where a calibrated model lies; each point's
    size follows its bin's image count."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for (name, rows), color in zip(curves.items(), sns.color_palette("viridis", len(curves)), strict=True):
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        label = f"{name} (ECE {ece[name]:.3f})" if ece and name in ece else name
        ax.plot(frame.confidence, frame.accuracy, color=color, marker=None, linewidth=1.5, label=label)
        sizes = 20 + 180 * frame.images / max(1, frame.images.max())
        ax.scatter(frame.confidence, frame.accuracy, s=sizes, color=color, alpha=0.8, edgecolor="white")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-label probability, bin mean)", ylabel="accuracy in bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)
