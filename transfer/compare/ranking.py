"""Ranking and winners: pure functions over leaderboard rows (no TensorFlow, no files)."""

from __future__ import annotations

import statistics


def competition_rank(values: list[float]) -> list[int]:
    """Rank (1 = best) where higher is better; ties share the better rank ("1224" ranking)."""
    return [1 + sum(other > value for other in values) for value in values]


def pareto_front(accuracy: list[float], cost: list[float]) -> list[int]:
    """Indices of points no other point dominates (accuracy at least as high and cost at least as low,
    one of them strictly), in input order."""
    front = []
    for i, (a, c) in enumerate(zip(accuracy, cost, strict=True)):
        dominated = any(
            (a2 >= a and c2 <= c) and (a2 > a or c2 < c)
            for j, (a2, c2) in enumerate(zip(accuracy, cost, strict=True)) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pick_winners(rows: list[dict]) -> list[dict]:
    """The most accurate cells and the Pareto-optimal ones on accuracy vs latency and vs size, with reasons."""
    acc = [r["test_accuracy"] for r in rows]
    reasons: dict[int, list[str]] = {}
    for i, r in enumerate(rows):
        if r["rank"] == 1:
            reasons.setdefault(i, []).append("most accurate")
    for i in pareto_front(acc, [r["latency_ms"] for r in rows]):
        reasons.setdefault(i, []).append("pareto: accuracy vs latency")
    for i in pareto_front(acc, [r["size_bytes"] for r in rows]):
        reasons.setdefault(i, []).append("pareto: accuracy vs size")
    return [{"cell": rows[i]["cell"], "why": why, "test_accuracy": rows[i]["test_accuracy"],
             "latency_ms": rows[i]["latency_ms"], "size_bytes": rows[i]["size_bytes"],
             "best_run": rows[i]["best_run"], "run_dirs": rows[i]["run_dirs"]}
            for i, why in sorted(reasons.items(), key=lambda item: rows[item[0]]["rank"])]
