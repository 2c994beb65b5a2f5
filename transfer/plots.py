"""Plots a run writes: train vs validation accuracy and loss per epoch, and the confusion matrix."""

from __future__ import annotations

import itertools
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], out_dir: Path, title: str) -> list[Path]:
    """``accuracy.png`` and ``loss.png``: train vs validation per epoch, phase changes marked."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    epochs = [row["epoch"] for row in history]
    boundaries = [row["epoch"] - 0.5 for prev, row in itertools.pairwise(history) if row["phase"] != prev["phase"]]
    for metric, label in (("accuracy", "accuracy"), ("loss", "loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, name in ((metric, "train"), (f"val_{metric}", "validation")):
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=name)
        for x in boundaries:
            ax.axvline(x, color="grey", linestyle="--", linewidth=1, label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {label}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_confusion(confusion: list[list[int]], classes: list[str], out_path: Path, title: str) -> Path:
    """A row-normalised confusion matrix with counts in the cells when there are few classes."""
    import numpy as np

    plt = _pyplot()
    matrix = np.asarray(confusion, dtype=float)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.4 * len(classes), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    if len(classes) <= 30:
        ax.set_xticks(ticks, classes, rotation=90)
        ax.set_yticks(ticks, classes)
    if len(classes) <= 15:
        for i in ticks:
            for j in ticks:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
