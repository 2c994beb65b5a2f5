"""The comparison report: leaderboard (md, csv, json), winners.json, plots and a self-contained report.html."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import tempfile
from pathlib import Path

from transfer import rundir
from transfer.compare.ranking import rank_by_of
from transfer.plots import plot_comparison

PLOTS = ("accuracy_vs_latency.png", "accuracy_vs_size.png", "learning_curves.png", "accuracy_bars.png")


COLUMNS = (  # (key, header)
    ("rank", "rank"), ("cell", "cell"), ("test_accuracy", "test acc"), ("accuracy_ci95", "95% interval"),
    ("verdict", "vs best / chance"), ("top5_accuracy", "top-5"), ("params", "params"),
    ("trainable_params", "trainable"), ("size_bytes", "size (float32 weights)"), ("train_seconds", "train time"),
    ("latency_ms", "latency b=1"),
)


# The class-averaged metrics --rank-by can choose: (row key, header)
RANKED_COLUMNS = {"balanced_accuracy": ("test_balanced_accuracy", "balanced acc"),
                  "macro_f1": ("test_macro_f1", "macro-F1")}


def columns(rank_by: str = "accuracy") -> tuple:
    """The leaderboard's columns: ranked by accuracy, :data:`COLUMNS`; by another metric, that metric and its
    interval lead, accuracy follows."""
    if rank_by == "accuracy":
        return COLUMNS
    key, header = RANKED_COLUMNS[rank_by]
    rest = tuple(c for c in COLUMNS if c[0] not in ("rank", "cell", "test_accuracy", "accuracy_ci95", "verdict"))
    return (("rank", "rank"), ("cell", "cell"), (key, header), ("rank_ci95", "95% interval"),
            ("verdict", "vs best / chance"), ("test_accuracy", "test acc"), *rest)


def verdict(row: dict) -> str:
    """How a row stands: at chance, tied with the best within noise, or significantly below it."""
    if not row.get("above_chance", True):
        return f"not above chance ({row.get('rank_chance', row['chance_accuracy']) * 100:.1f}%)"
    return "best or tied within noise" if row.get("tied_with_best") else "below the best"


def _cell_text(row: dict, key: str) -> str:
    if key == "verdict":
        return verdict(row)
    value = row[key]
    if key in ("accuracy_ci95", "rank_ci95"):
        return f"{value[0] * 100:.1f}–{value[1] * 100:.1f}%"
    if key in ("test_accuracy", "top5_accuracy", "test_balanced_accuracy", "test_macro_f1"):
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


def _interval_text(rows: list[dict]) -> str:
    """How the ranking metric and its interval were computed (one sentence)."""
    n = rows[0]["test_samples"] if rows else 0
    rank_by = rank_by_of(rows)
    if rank_by == "accuracy":
        return f"Accuracy is mean ± sample std over seeds, with its 95% Wilson interval on the {n} test images"
    from transfer.compare.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    return (f"Ranked by {RANKED_COLUMNS[rank_by][1]} (classes present in the test split averaged): mean ± sample std "
            f"over seeds, with its 95% bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of the {n} test images, "
            f"seed {BOOTSTRAP_SEED}); chance is 1/classes")


def _markdown(rows: list[dict], winners: list[dict], title: str, settings: dict) -> str:
    cols = columns(rank_by_of(rows))
    lines = [f"# Comparison: {title}", "",
             f"Dataset `{settings['dataset']}` (fingerprint `{settings['fingerprint'][:12]}`), seeds "
             f"{settings['seeds']}, epochs {settings['train']['epochs']}, batch {settings['train']['batch_size']}. "
             f"{_interval_text(rows)}; cells within noise of the best are tied and the "
             "tie goes to the smallest deployable model (float32 weights), then the lowest latency; a cell not "
             "significantly above chance is never a winner. Latency is the median of batch-1 calls on one "
             "native-size image.", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell_text(r, k) for k, _ in cols) + " |" for r in rows]
    lines += ["", "## Winners", ""]
    lines += [f"- **{w['cell']}** — {', '.join(w['why'])} (`{w['best_run']}`)" for w in winners]
    return "\n".join(lines) + "\n"


def _html(rows: list[dict], winners: list[dict], title: str, settings: dict, plots: list[Path]) -> str:
    import html

    from transfer.render import html_figures, html_page, html_table

    cols = columns(rank_by_of(rows))
    board = html_table([h for _, h in cols], [[html.escape(_cell_text(r, k)) for k, _ in cols] for r in rows])
    wins = "".join(f"<li><b>{html.escape(w['cell'])}</b> — {html.escape(', '.join(w['why']))} "
                   f"(<code>{html.escape(w['best_run'])}</code>)</li>" for w in winners)
    return html_page(f"Comparison: {title}", f"""<h1>Comparison: {html.escape(title)}</h1>
<p>Dataset <code>{html.escape(settings['dataset'])}</code> (fingerprint <code>{settings['fingerprint'][:12]}</code>),
seeds {settings['seeds']}, epochs {settings['train']['epochs']}, batch {settings['train']['batch_size']}.
{html.escape(_interval_text(rows))}. Latency: median of batch-1 calls on one native-size image.</p>
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
        plots = plot_comparison(rows, tmp / "plots", PLOTS)
        public = [{k: v for k, v in r.items() if k != "history"} for r in rows]
        (tmp / "leaderboard.md").write_text(_markdown(rows, winners, title, settings))
        with open(tmp / "leaderboard.csv", "w", newline="") as handle:
            fields = [k for k in public[0] if k not in ("augment", "run_dirs", "test_accuracies", "seeds",
                                                        "epochs_run", "confusion_matrix")]
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
    n = rows[0]["test_samples"] if rows else 0
    (key, header), (ci, _) = columns(rank_by_of(rows))[2:4]
    print(f"\n{'rank':>4}  {'cell':<28}{header:>16}{'95% interval':>15}  {'vs best / chance':<28}"
          f"{'latency':>10}{'size':>11}")
    for r in rows:
        print(f"{r['rank']:>4}  {(r['cell'] + marks.get(r['cell'], '')):<28}{_cell_text(r, key):>16}"
              f"{_cell_text(r, ci):>15}  {verdict(r):<28}{_cell_text(r, 'latency_ms'):>10}"
              f"{_cell_text(r, 'size_bytes'):>11}")
    print(f"* winner. {n} test images; cells within noise of the best are tied (the smallest deployable model wins "
          "the tie); a cell not significantly above chance never wins. size: float32 weights.")
    sys.stdout.flush()
