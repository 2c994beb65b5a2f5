"""Comparison plots show what the comparison ranks by: accuracy by default, the --rank-by metric otherwise."""

from __future__ import annotations

import pytest

from transfer import plots
from transfer.compare.ranking import annotate


def _rows(tmp_path) -> list[dict]:
    history = tmp_path / "history.csv"
    history.write_text("epoch,phase,loss,accuracy,top5,val_loss,val_accuracy,val_top5,lr,seconds\n"
                       "1,train,1.0,0.5,,1.1,0.45,,0.001,1.0\n")
    # Two cells on 100 test images: "a" is more accurate, "b" has the better balanced accuracy (a misses class 1).
    confusions = {"a": [[90, 0], [8, 2]], "b": [[60, 30], [0, 10]]}
    rows = []
    for cell, confusion in confusions.items():
        correct = confusion[0][0] + confusion[1][1]
        recall = [confusion[i][i] / sum(confusion[i]) for i in range(2)]
        rows.append({"cell": cell, "test_samples": 100, "test_accuracy": correct / 100, "chance_accuracy": 0.5,
                     "test_accuracy_std": None, "confusion_matrix": confusion,
                     "test_balanced_accuracy": sum(recall) / 2, "test_balanced_accuracy_std": None,
                     "latency_ms": 1.0 if cell == "a" else 2.0, "size_bytes": 1e6, "history": str(history)})
    return rows


@pytest.mark.parametrize("rank_by", ["accuracy", "balanced_accuracy"])
def test_tradeoff_and_bar_plots_show_the_ranked_metric(tmp_path, monkeypatch, rank_by):
    rows = _rows(tmp_path)
    annotate(rows, rank_by=rank_by)
    figures = []
    plt = plots._pyplot()
    monkeypatch.setattr(plt, "close", figures.append)  # keep every figure to read its axes back
    written = plots.plot_comparison(rows, tmp_path / "plots", ("lat.png", "size.png", "curves.png", "bars.png"))
    assert all(path.stat().st_size > 0 for path in written)
    latency, _, _, bars = (figure.axes[0] for figure in figures)
    expected = [r["test_accuracy" if rank_by == "accuracy" else "test_balanced_accuracy"] * 100 for r in rows]
    name = "accuracy" if rank_by == "accuracy" else "balanced accuracy"
    assert latency.get_ylabel() == f"test {name} (%), 95% interval"
    points = [line.get_ydata()[0] for line in latency.lines if line.get_marker() == "o"]  # not caps or the front
    assert points == pytest.approx(expected)
    assert bars.get_ylabel() == f"test {name} (%) (one seed)"
    assert [patch.get_height() for patch in bars.patches] == pytest.approx(expected)
