"""Ranking and winners: pure functions over leaderboard rows (no TensorFlow, no files).

Winners must deserve it (transfer.compare.stats): a cell not significantly above chance (the larger of 1/classes and
the test split's majority class) is never a winner; cells whose accuracy is within noise of the best are reported as
tied and the tie is broken by the smaller deployable model, then the lower latency; on the accuracy-vs-cost fronts a
costlier cell wins only when it is significantly more accurate than every cheaper one.
"""

from __future__ import annotations

import statistics

from transfer.compare.stats import ALPHA, p_above_chance, significantly_better, wilson_interval


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


def annotate(rows: list[dict], alpha: float = ALPHA) -> None:
    """Add to every row (in place): its 95 % interval, the chance level, whether it beats chance, and whether it is
    tied with the most accurate cell that does (``tied_with_best``)."""
    for r in rows:
        n, correct = r["test_samples"], r["test_accuracy"] * r["test_samples"]
        r["accuracy_ci95"] = list(wilson_interval(correct, n))
        r["p_vs_chance"] = p_above_chance(correct, n, r["chance_accuracy"])
        r["above_chance"] = r["p_vs_chance"] < alpha
    eligible = [r for r in rows if r["above_chance"]]
    best = max(eligible, key=lambda r: r["test_accuracy"]) if eligible else None
    for r in rows:
        r["tied_with_best"] = best is not None and r["above_chance"] and not significantly_better(best, r, alpha)


def robust_front(rows: list[dict], cost_key: str, alpha: float = ALPHA) -> list[int]:
    """Indices of the rows above chance on the accuracy-vs-``cost_key`` front, with noise: row i is dominated when
    another row costs no more, is not significantly less accurate, and is cheaper or more accurate."""
    eligible = [i for i, r in enumerate(rows) if r["above_chance"]]
    front = []
    for i in eligible:
        a = rows[i]
        dominated = any(
            rows[j][cost_key] <= a[cost_key] and not significantly_better(a, rows[j], alpha)
            and (rows[j][cost_key] < a[cost_key] or rows[j]["test_accuracy"] > a["test_accuracy"])
            for j in eligible if j != i
        )
        if not dominated:
            front.append(i)
    return front


def pick_winners(rows: list[dict]) -> list[dict]:
    """The most accurate cell (ties within noise broken by deployable size, then latency) and the noise-robust
    Pareto-optimal cells on accuracy vs latency and vs size, each with its reasons; never a cell at chance level.
    Rows must have been through :func:`annotate`."""
    reasons: dict[int, list[str]] = {}
    tied = [i for i, r in enumerate(rows) if r["tied_with_best"]]
    if tied:
        top = min(tied, key=lambda i: (rows[i]["size_bytes"], rows[i]["latency_ms"]))
        others = [rows[i]["cell"] for i in tied if i != top]
        reasons[top] = ["most accurate" if not others else
                        f"most accurate (tied within noise with {', '.join(others)}; the smallest deployable model)"]
    for i in robust_front(rows, "latency_ms"):
        reasons.setdefault(i, []).append("pareto: accuracy vs latency")
    for i in robust_front(rows, "size_bytes"):
        reasons.setdefault(i, []).append("pareto: accuracy vs size")
    return [{"cell": rows[i]["cell"], "why": why, "test_accuracy": rows[i]["test_accuracy"],
             "accuracy_ci95": rows[i]["accuracy_ci95"], "latency_ms": rows[i]["latency_ms"],
             "size_bytes": rows[i]["size_bytes"], "best_run": rows[i]["best_run"], "run_dirs": rows[i]["run_dirs"]}
            for i, why in sorted(reasons.items(), key=lambda item: (rows[item[0]]["rank"], item[0]))]
