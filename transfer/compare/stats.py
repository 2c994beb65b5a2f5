"""The statistics behind a ranking: how sure a test accuracy is, whether it beats chance, whether two cells differ.

Every test set is finite: 180 test images resolve about ±3 points, so 99.4 % and 97.8 % may be the same model.
A cell's accuracy is ``correct`` of ``n`` test images (for several seeds: the mean accuracy times ``n``, the same
test images each time). Pure Python; no SciPy.
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


def significantly_better(a: dict, b: dict, alpha: float = ALPHA) -> bool:
    """Whether row ``a`` is more accurate than row ``b`` beyond noise (rows carry test_accuracy, test_samples)."""
    return p_better(a["test_accuracy"] * a["test_samples"], a["test_samples"],
                    b["test_accuracy"] * b["test_samples"], b["test_samples"]) < alpha
