"""The statistics behind a ranking: how sure a test metric is, whether it beats chance, whether two cells differ.

Every test set is finite: 180 test images resolve about ±3 points, so 99.4 % and 97.8 % may be the same model.
A cell's accuracy is ``correct`` of ``n`` test images (for several seeds: the mean accuracy times ``n``, the same
test images each time). Accuracy gets exact tools (Wilson interval, binomial test); balanced accuracy and macro-F1,
averages of per-class ratios with no closed form, get a seeded bootstrap over the test images (:func:`bootstrap`,
NumPy). No SciPy.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95 %
ALPHA = 0.05  # one-sided significance level of every comparison


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); sound near 0 and 1, unlike p ± 1.96 SE."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P[X >= k] for X ~ Binomial(n, p), summed exactly in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    if p == 0.5:  # the McNemar tail (export verification): exact in integers, one rounding at the end
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def p_above_chance(correct: float, n: int, chance: float) -> float:
    """One-sided p-value that an accuracy of ``correct``/``n`` is above ``chance`` (exact binomial test)."""
    return binomial_sf(math.ceil(correct - 1e-9), n, chance)


def p_better(correct_a: float, n_a: int, correct_b: float, n_b: int) -> float:
    """One-sided p-value that accuracy A is above accuracy B (two-proportion z-test, pooled; with a continuity
    correction, so that one test image of difference is never "significant" on a small set)."""
    if n_a <= 0 or n_b <= 0:
        return 1.0
    pa, pb = correct_a / n_a, correct_b / n_b
    pooled = (correct_a + correct_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    diff = pa - pb - 0.5 * (1 / n_a + 1 / n_b)
    if se == 0:
        return 0.0 if diff > 0 else 1.0
    return 0.5 * math.erfc(diff / se / math.sqrt(2))


def p_better_normal(value_a: float, se_a: float, value_b: float, se_b: float) -> float:
    """One-sided p-value that A is above B from two independent estimates and their (bootstrap) standard errors."""
    se = math.sqrt(se_a * se_a + se_b * se_b)
    if se == 0 or not math.isfinite(se):
        return 0.0 if se == 0 and value_a > value_b else 1.0
    return 0.5 * math.erfc((value_a - value_b) / se / math.sqrt(2))


def significantly_better(a: dict, b: dict, alpha: float = ALPHA) -> bool:
    """Whether row ``a`` beats row ``b`` beyond noise on the ranking metric. Accuracy (rows carry test_accuracy,
    test_samples): the two-proportion test. A metric chosen by ``--rank-by`` otherwise (rows annotated with
    ``rank_by``, ``rank_value`` and the bootstrap's ``rank_se``): a normal test on the bootstrap standard errors."""
    if a.get("rank_by", "accuracy") == "accuracy":
        return p_better(a["test_accuracy"] * a["test_samples"], a["test_samples"],
                        b["test_accuracy"] * b["test_samples"], b["test_samples"]) < alpha
    return p_better_normal(a["rank_value"], a["rank_se"], b["rank_value"], b["rank_se"]) < alpha



BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap(confusion, metric: str, chance: float, n: int | None = None, *, resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> dict:
    """The one bootstrap of a class-averaged metric (``balanced_accuracy`` or ``macro_f1`` of transfer.evaluate):
    ``resamples`` seeded draws of ``n`` test images with replacement, as a multinomial over the confusion matrix's
    cells (the matrix is all these metrics depend on, so resampling its cells is resampling the images).

    Returns the 95 % percentile interval ``ci95``, the standard error ``se`` and ``p_vs_chance``, the one-sided
    bootstrap p-value that the metric is above ``chance``: (draws at or below chance + 1) / (resamples + 1).
    ``confusion`` may be several seeds' matrices of the same test images summed; ``n`` (default: its total) is then
    the test set's size, as the accuracy interval uses it.
    """
    import numpy as np

    from transfer import evaluate

    functions = {"balanced_accuracy": evaluate.balanced_accuracy, "macro_f1": evaluate.macro_f1}
    cells = np.asarray(confusion, dtype=np.float64)
    total = cells.sum()
    n = int(total) if n is None else int(n)
    if total <= 0 or n <= 0:
        return {"ci95": [0.0, 1.0], "se": float("inf"), "p_vs_chance": 1.0}
    draws = np.random.default_rng(seed).multinomial(n, (cells / total).ravel(), size=resamples)
    values = functions[metric](draws.reshape(resamples, *cells.shape))
    low, high = np.quantile(values, [0.025, 0.975])
    return {"ci95": [float(low), float(high)], "se": float(values.std(ddof=1)),
            "p_vs_chance": float((np.sum(values <= chance) + 1) / (resamples + 1))}
