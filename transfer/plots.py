"""Every plot the toolkit draws: a run's accuracy/loss curves, confusion matrix and Grad-CAM grid, a comparison's
trade-off, learning curve and accuracy plots (matplotlib, Agg backend)."""

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


def plot_gradcam_grid(tiles: list[tuple], per_row: int, out_path: Path, title: str) -> Path:
    """Grad-CAM overlays in a grid, ``per_row`` to a row; ``tiles`` = (RGB uint8 overlay, caption, wrong), the
    captions of wrong predictions in red."""
    plt = _pyplot()
    rows = max(1, -(-len(tiles) // per_row))
    fig, axes = plt.subplots(rows, per_row, figsize=(2.2 * per_row + 0.4, 2.5 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption, wrong) in zip(axes.flat, tiles, strict=False):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8, color="#b00" if wrong else "black")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def cell_colours(names: list[str]) -> dict[str, tuple]:
    """One colour per cell, the same in every plot of a comparison (tab10, then tab20 beyond ten cells)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def ranked_metric(rows: list[dict]) -> tuple[str, str, str]:
    """What a comparison ranks by (``--rank-by``, recorded on its rows by ``annotate``): (row key of the mean, row key
    of its 95 % interval, axis label)."""
    from transfer.compare.ranking import METRIC_NAMES, metric_key, rank_by_of

    rank_by = rank_by_of(rows)
    return metric_key(rank_by), "rank_ci95", f"test {METRIC_NAMES[rank_by]}"


def plot_tradeoff(plt, rows: list[dict], key: str, label: str, path: Path, colours: dict, scale: float = 1.0) -> None:
    """The ranked metric (accuracy unless ``--rank-by`` said otherwise; with its 95 % interval) against a cost; each
    cell in its colour, named in the legend (labels next to points would overprint), the winners' noise-robust front
    joined up."""
    from transfer.compare.ranking import robust_front

    metric, interval, metric_label = ranked_metric(rows)
    acc = [r[metric] * 100 for r in rows]
    cost = [r[key] * scale for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r, x, y in zip(rows, cost, acc, strict=True):
        low, high = (v * 100 for v in r.get(interval) or (y / 100, y / 100))
        ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o", color=colours[r["cell"]], capsize=3,
                    label=r["cell"] + ("" if r.get("above_chance", True) else " (at chance)"), zorder=2)
    if all("above_chance" in r for r in rows):
        front = sorted(robust_front(rows, key), key=lambda i: cost[i])
        ax.plot([cost[i] for i in front], [acc[i] for i in front], color="black", linestyle="--", linewidth=1,
                zorder=1, label="winners' front")
    ax.set_xlabel(label)
    ax.set_ylabel(f"{metric_label} (%), 95% interval")
    if len(set(cost)) > 1 and min(cost) > 0 and max(cost) / min(cost) > 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(rows: list[dict], out: Path, names: tuple[str, ...]) -> list[Path]:
    """A comparison's plots, written as ``names`` in ``out``: accuracy vs latency and vs size (the winners' front
    marked), overlaid learning curves, bars of the ranked metric; one colour per cell throughout. The trade-offs and
    bars show what the comparison ranks by (``--rank-by``); the learning curves are accuracy, as training logs it."""
    from matplotlib.ticker import MaxNLocator

    from transfer.train import read_history

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    colours = cell_colours([r["cell"] for r in rows])
    plot_tradeoff(plt, rows, "latency_ms", "batch-1 latency (ms)", out / names[0], colours)
    plot_tradeoff(plt, rows, "size_bytes", "deployable size, float32 weights (MB)", out / names[1], colours,
                  scale=1e-6)

    fig, ax = plt.subplots(figsize=(9, 5))
    for r in rows:
        history = read_history(Path(r["history"]))
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h.get("val_accuracy") for h in history], color=colours[r["cell"]], label=r["cell"])
        ax.plot(epochs, [h.get("accuracy") for h in history], linestyle=":", color=colours[r["cell"]])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (solid: validation, dotted: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / names[2], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 5))
    metric, _, metric_label = ranked_metric(rows)
    means = [r[metric] * 100 for r in rows]
    several_seeds = any(r.get(f"{metric}_std") is not None for r in rows)
    errors = [(r.get(f"{metric}_std") or 0) * 100 for r in rows] if several_seeds else None
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4 if several_seeds else 0,
           color=[colours[r["cell"]] for r in rows])
    ax.set_xticks(range(len(rows)), [r["cell"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric_label} (%)" + (" (mean ± std over seeds)" if several_seeds else " (one seed)"))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / names[3], dpi=100)
    plt.close(fig)
    return [out / name for name in names]
