"""Ranking and winners: pure functions over leaderboard rows (no TensorFlow, no files).

Winners must deserve it (transfer.compare.stats): a cell not significantly above chance is never a winner; cells whose
ranking metric is within noise of the best are reported as tied and the tie is broken by the smaller deployable
model, then the lower latency; on the metric-vs-cost fronts a costlier cell wins only when it is significantly better
than every cheaper one. The ranking metric (``--rank-by``) is accuracy (chance: the larger of 1/classes and the test
split's majority class; Wilson intervals), balanced accuracy or macro-F1 (chance: 1/classes present in the test
split, what any predictor that ignores the image scores on average; bootstrap intervals).
"""

from __future__ import annotations

import statistics

from transfer.compare.stats import ALPHA, bootstrap, p_above_chance, significantly_better, wilson_interval
from transfer.config import CompareConfig

RANK_BY_DEFAULT = CompareConfig.rank_by  # the field's default (transfer.config)
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1"}


def rank_by_of(rows: list[dict]) -> str:
    """The metric a comparison's rows were ranked by (``annotate`` records it on every row); accuracy when unranked."""
    return rows[0].get("rank_by", RANK_BY_DEFAULT) if rows else RANK_BY_DEFAULT


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


def metric_key(rank_by: str) -> str:
    """The row key of a ranking metric: ``test_accuracy``, ``test_balanced_accuracy``, ``test_macro_f1``."""
    return f"test_{rank_by}"


def annotate(rows: list[dict], alpha: float = ALPHA, rank_by: str = RANK_BY_DEFAULT) -> None:
    """Add to every row (in place): its accuracy's 95 % interval (``accuracy_ci95``); for the ranking metric
    ``rank_by`` its value, 95 % interval and chance level (``rank_value``, ``rank_ci95``, ``rank_chance``; the
    bootstrap's ``rank_se`` for the class-averaged metrics, which need the row's ``confusion_matrix``), whether it
    beats chance, and whether it is tied with the best cell that does (``tied_with_best``)."""
    for r in rows:
        n, correct = r["test_samples"], r["test_accuracy"] * r["test_samples"]
        r["accuracy_ci95"] = list(wilson_interval(correct, n))
        r["rank_by"], r["rank_value"] = rank_by, r[metric_key(rank_by)]
        if rank_by == "accuracy":
            r["rank_ci95"], r["rank_chance"] = r["accuracy_ci95"], r["chance_accuracy"]
            r["p_vs_chance"] = p_above_chance(correct, n, r["chance_accuracy"])
        else:
            present = sum(1 for row in r["confusion_matrix"] if sum(row) > 0)
            r["rank_chance"] = 1 / max(present, 1)
            boot = bootstrap(r["confusion_matrix"], rank_by, r["rank_chance"], n)
            r["rank_ci95"], r["rank_se"], r["p_vs_chance"] = boot["ci95"], boot["se"], boot["p_vs_chance"]
        r["above_chance"] = r["p_vs_chance"] < alpha
    eligible = [r for r in rows if r["above_chance"]]
    best = max(eligible, key=lambda r: r["rank_value"]) if eligible else None
    for r in rows:
        r["tied_with_best"] = best is not None and r["above_chance"] and not significantly_better(best, r, alpha)


def robust_front(rows: list[dict], cost_key: str, alpha: float = ALPHA) -> list[int]:
    """Indices of the rows above chance on the metric-vs-``cost_key`` front, with noise: row i is dominated when
    another row costs no more, is not significantly worse, and is cheaper or better (rows through :func:`annotate`)."""
    eligible = [i for i, r in enumerate(rows) if r["above_chance"]]
    front = []
    for i in eligible:
        a = rows[i]
        dominated = any(
            rows[j][cost_key] <= a[cost_key] and not significantly_better(a, rows[j], alpha)
            and (rows[j][cost_key] < a[cost_key] or rows[j]["rank_value"] > a["rank_value"])
            for j in eligible if j != i
        )
        if not dominated:
            front.append(i)
    return front


def pick_winners(rows: list[dict]) -> list[dict]:
    """The best cell on the ranking metric (ties within noise broken by deployable size, then latency) and the
    noise-robust Pareto-optimal cells on that metric vs latency and vs size, each with its reasons; never a cell at
    chance level. Rows must have been through :func:`annotate`."""
    reasons: dict[int, list[str]] = {}
    tied = [i for i, r in enumerate(rows) if r["tied_with_best"]]
    rank_by = rank_by_of(rows)
    best, axis = (("most accurate", "accuracy") if rank_by == "accuracy" else
                  (f"best {METRIC_NAMES[rank_by]}", METRIC_NAMES[rank_by]))
    if tied:
        top = min(tied, key=lambda i: (rows[i]["size_bytes"], rows[i]["latency_ms"]))
        others = [rows[i]["cell"] for i in tied if i != top]
        reasons[top] = [best if not others else
                        f"{best} (tied within noise with {', '.join(others)}; the smallest deployable model)"]
    for i in robust_front(rows, "latency_ms"):
        reasons.setdefault(i, []).append(f"pareto: {axis} vs latency")
    for i in robust_front(rows, "size_bytes"):
        reasons.setdefault(i, []).append(f"pareto: {axis} vs size")
    return [{"cell": rows[i]["cell"], "why": why, "test_accuracy": rows[i]["test_accuracy"],
             "accuracy_ci95": rows[i]["accuracy_ci95"], "rank_by": rank_by, "rank_value": rows[i]["rank_value"],
             "rank_ci95": rows[i]["rank_ci95"], "latency_ms": rows[i]["latency_ms"],
             "size_bytes": rows[i]["size_bytes"], "best_run": rows[i]["best_run"], "run_dirs": rows[i]["run_dirs"]}
            for i, why in sorted(reasons.items(), key=lambda item: (rows[item[0]]["rank"], item[0]))]
