"""The comparison report: leaderboard (md, csv, json), winners.json, plots and a self-contained report.html."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import tempfile
from pathlib import Path

from transfer import rundir
from transfer.compare.ranking import pareto_front

PLOTS = ("accuracy_vs_latency.png", "accuracy_vs_size.png", "learning_curves.png", "accuracy_bars.png")


COLUMNS = (  # (key, header)
    ("rank", "rank"), ("cell", "cell"), ("test_accuracy", "test acc"), ("top5_accuracy", "top-5"),
    ("params", "params"), ("trainable_params", "trainable"), ("size_bytes", "size"), ("train_seconds", "train time"),
    ("latency_ms", "latency b=1"),
)


def _cell_text(row: dict, key: str) -> str:
    value = row[key]
    if key in ("test_accuracy", "top5_accuracy"):
        if value is None:
            return "—"
        std = row[f"{key}_std"]
        return f"{value * 100:.2f}%" + (f" ± {std * 100:.2f}" if std is not None else "")
    if key in ("params", "trainable_params"):
        return f"{value:,}"
    if key == "size_bytes":
        return f"{value / 1e6:.2f} MB"
    if key == "train_seconds":
        return f"{value:.1f} s"
    if key == "latency_ms":
        return f"{value:.2f} ms"
    return str(value)


def _markdown(rows: list[dict], winners: list[dict], title: str, settings: dict) -> str:
    lines = [f"# Comparison: {title}", "",
             f"Dataset `{settings['dataset']}` (fingerprint `{settings['fingerprint'][:12]}`), seeds "
             f"{settings['seeds']}, epochs {settings['train']['epochs']}, batch {settings['train']['batch_size']}. "
             "Accuracy is mean ± sample std over seeds; latency is the median of batch-1 calls on one native-size "
             "image.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell_text(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    lines += ["", "## Winners", ""]
    lines += [f"- **{w['cell']}** — {', '.join(w['why'])} (`{w['best_run']}`)" for w in winners]
    return "\n".join(lines) + "\n"


def _plot_tradeoff(plt, rows: list[dict], key: str, label: str, path: Path, scale: float = 1.0) -> None:
    acc = [r["test_accuracy"] * 100 for r in rows]
    cost = [r[key] * scale for r in rows]
    front = sorted(pareto_front(acc, cost), key=lambda i: cost[i])
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(cost, acc, color="tab:blue", zorder=2, label="cells")
    ax.plot([cost[i] for i in front], [acc[i] for i in front], color="tab:red", marker="o", markersize=9,
            markerfacecolor="none", linewidth=1.5, zorder=3, label="Pareto front")
    for r, x, y in zip(rows, cost, acc, strict=True):
        ax.annotate(r["cell"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    if len(set(cost)) > 1 and min(cost) > 0 and max(cost) / min(cost) > 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """Accuracy vs latency and vs size (Pareto front marked), overlaid learning curves, accuracy bars."""
    from transfer.plots import _pyplot
    from transfer.train import read_history

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    _plot_tradeoff(plt, rows, "latency_ms", "batch-1 latency (ms)", out / PLOTS[0])
    _plot_tradeoff(plt, rows, "size_bytes", "model file size (MB)", out / PLOTS[1], scale=1e-6)

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        history = read_history(Path(r["history"]))
        line, = ax.plot([h["epoch"] for h in history], [h.get("val_accuracy") for h in history], label=r["cell"])
        ax.plot([h["epoch"] for h in history], [h.get("accuracy") for h in history], linestyle=":",
                color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (solid: validation, dotted: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 5))
    means = [r["test_accuracy"] * 100 for r in rows]
    errors = [(r["test_accuracy_std"] or 0) * 100 for r in rows]
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4,
           color=["tab:orange" if r["kind"] == "baseline" else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), [r["cell"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)  (orange: scratch baseline, blue: fine-tuned)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / PLOTS[3], dpi=100)
    plt.close(fig)
    return [out / name for name in PLOTS]


def _html(rows: list[dict], winners: list[dict], title: str, settings: dict, plots: list[Path]) -> str:
    import html

    from transfer.render import html_figures, html_page, html_table

    board = html_table([h for _, h in COLUMNS], [[html.escape(_cell_text(r, k)) for k, _ in COLUMNS] for r in rows])
    wins = "".join(f"<li><b>{html.escape(w['cell'])}</b> — {html.escape(', '.join(w['why']))} "
                   f"(<code>{html.escape(w['best_run'])}</code>)</li>" for w in winners)
    return html_page(f"Comparison: {title}", f"""<h1>Comparison: {html.escape(title)}</h1>
<p>Dataset <code>{html.escape(settings['dataset'])}</code> (fingerprint <code>{settings['fingerprint'][:12]}</code>),
seeds {settings['seeds']}, epochs {settings['train']['epochs']}, batch {settings['train']['batch_size']}.
Accuracy: mean ± sample std over seeds. Latency: median of batch-1 calls on one native-size image.</p>
{board}
<h2>Winners</h2><ul>{wins}</ul>
<h2>Plots</h2>{html_figures(plots)}""")


# What a compare report consists of; leaderboard.json is swapped in last, so it never describes files not yet written.
REPORT_DIRS = ("plots",)
REPORT_FILES = ("leaderboard.md", "leaderboard.csv", "report.html", "winners.json", "leaderboard.json")


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the report written in ``tmp`` into ``out`` entry by entry (each move atomic), leaving every other file in
    ``out`` (a pipeline's pipeline.html, the user's notes) where it is."""
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_DIRS:
        if (out / name).exists():
            os.replace(out / name, tmp / f".previous-{name}")  # dropped with tmp below
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    for name in REPORT_FILES:
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp)


def write_report(out: Path, title: str, rows: list[dict], winners: list[dict], settings: dict) -> Path:
    """Write every report file into a temporary directory, then move them into ``out``, replacing only the files a
    report consists of (REPORT_FILES, REPORT_DIRS)."""
    import csv

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plots = write_plots(rows, tmp / "plots")
        public = [{k: v for k, v in r.items() if k != "history"} for r in rows]
        (tmp / "leaderboard.md").write_text(_markdown(rows, winners, title, settings))
        with open(tmp / "leaderboard.csv", "w", newline="") as handle:
            fields = [k for k in public[0] if k not in ("augment", "run_dirs", "test_accuracies", "seeds",
                                                        "epochs_run")]
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(public)
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        rundir.write_json(tmp / "leaderboard.json", {"name": title, "created": created, "settings": settings,
                                                     "rows": public, "winners": winners})
        rundir.write_json(tmp / "winners.json", {"name": title, "created": created, "winners": winners})
        (tmp / "report.html").write_text(_html(rows, winners, title, settings, plots))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def print_table(rows: list[dict], winners: list[dict]) -> None:
    """A short leaderboard on the terminal."""
    marks = {w["cell"]: "*" for w in winners}
    print(f"\n{'rank':>4}  {'cell':<30}{'test acc':>18}{'latency':>11}{'size':>11}{'params':>13}")
    for r in rows:
        print(f"{r['rank']:>4}  {(r['cell'] + marks.get(r['cell'], '')):<30}{_cell_text(r, 'test_accuracy'):>18}"
              f"{_cell_text(r, 'latency_ms'):>11}{_cell_text(r, 'size_bytes'):>11}{r['params']:>13,}")
    print("* winner (most accurate or Pareto-optimal on accuracy vs latency/size)")
    sys.stdout.flush()
