"""Parity verification: compare an artifact's probabilities with the Keras model's on the same held-out images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from export.formats import Thresholds


def predict_batched(predict: Callable, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``predict`` over ``inputs`` in batches of ``batch_size`` (float32), concatenated."""
    inputs = np.asarray(inputs, dtype=np.float32)
    return np.concatenate([np.asarray(predict(inputs[i:i + batch_size]), dtype=np.float32)
                           for i in range(0, len(inputs), batch_size)])


def verify(reference_predict, candidate_predict, inputs, labels, thresholds: Thresholds, batch_size: int = 32) -> dict:
    """Compare two models on ``inputs`` and check ``thresholds``.

    ``reference_predict`` and ``candidate_predict`` are callables ``batch_float32 -> probabilities`` (or arrays of
    probabilities already computed on ``inputs``, so a reference is run once for many candidates). Returns max and mean
    absolute difference of the probabilities, top-1 agreement, both accuracies on ``labels``, and ``passed`` with the
    list of failed checks.
    """
    ref = _probabilities(reference_predict, inputs, batch_size)
    cand = _probabilities(candidate_predict, inputs, batch_size)
    if ref.shape != cand.shape:
        return {"passed": False, "failures": [f"output shape {list(cand.shape)} != reference {list(ref.shape)}"],
                "samples": len(ref), "thresholds": thresholds.as_dict()}
    labels = np.asarray(labels)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    ref_acc = float(np.mean(ref.argmax(1) == labels))
    acc = float(np.mean(cand.argmax(1) == labels))
    report = {
        "samples": len(ref),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
        "accuracy": acc,
        "reference_accuracy": ref_acc,
        "accuracy_drop": ref_acc - acc,
        "thresholds": thresholds.as_dict(),
    }
    failures = []
    if not np.all(np.isfinite(cand)):
        failures.append("non-finite probabilities")
    if thresholds.max_abs_diff is not None and not report["max_abs_diff"] <= thresholds.max_abs_diff:
        failures.append(f"max |diff| {report['max_abs_diff']:.3g} > {thresholds.max_abs_diff:g}")
    if thresholds.min_top1_agreement is not None and report["top1_agreement"] < thresholds.min_top1_agreement:
        failures.append(f"top-1 agreement {report['top1_agreement']:.2%} < {thresholds.min_top1_agreement:.0%}")
    # a small epsilon so 1 point on a float accuracy is not lost to rounding
    if thresholds.max_accuracy_drop is not None and report["accuracy_drop"] > thresholds.max_accuracy_drop + 1e-9:
        failures.append(f"accuracy {acc:.4f} is {report['accuracy_drop'] * 100:.2f} points below the Keras model's "
                        f"{ref_acc:.4f} (allowed {thresholds.max_accuracy_drop * 100:g})")
    report["passed"] = not failures
    report["failures"] = failures
    return report


def _probabilities(predict, inputs, batch_size) -> np.ndarray:
    if callable(predict):
        return predict_batched(predict, inputs, batch_size)
    return np.asarray(predict, dtype=np.float32)


def format_table(reports: dict[str, dict]) -> str:
    """The verification reports as a text table, one row per format."""
    header = f"{'format':<16}{'status':<22}{'max|diff|':>11}{'mean|diff|':>12}{'top-1 agree':>13}{'accuracy':>10}"
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        if "max_abs_diff" not in r:
            lines.append(f"{name:<16}{'failed':<22}  {'; '.join(r.get('failures', []))}")
            continue
        status = "ok" if r["passed"] else "FAILED: " + "; ".join(r["failures"])
        lines.append(f"{name:<16}{'verified' if r['passed'] else 'failed-verification':<22}{r['max_abs_diff']:>11.2e}"
                     f"{r['mean_abs_diff']:>12.2e}{r['top1_agreement']:>13.2%}{r['accuracy']:>10.4f}"
                     + ("" if r["passed"] else "  " + status))
    return "\n".join(lines)
