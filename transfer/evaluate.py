"""Test-set evaluation: accuracy, balanced accuracy, macro-F1, top-5, per-class precision/recall and the confusion
matrix.

Balanced accuracy (the mean per-class recall) and macro-F1 (the mean per-class F1) average over the classes **present
in the split** (support > 0): a class with no test images has no recall to average, so it neither counts as 0 nor
as 1. Predicting such a class is still a miss for the image's true class. Both match scikit-learn's
``balanced_accuracy_score`` and ``f1_score(average="macro", labels=<classes present in y_true>)``; an empty split
gives 0.0 like accuracy. :func:`balanced_accuracy` and :func:`macro_f1` work on one confusion matrix or a stack of
them (the comparison's bootstrap, ``transfer.compare.stats``).
"""

from __future__ import annotations

import numpy as np


def _per_class(confusion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, f1, present) per class of confusion matrices (..., K, K): rows true, columns predicted."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    actual, predicted = confusion.sum(axis=-1), confusion.sum(axis=-2)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    # F1 = 2 TP / (actual + predicted): the harmonic mean of precision and recall, 0 when there is nothing to divide
    f1 = np.divide(2 * tp, actual + predicted, out=np.zeros_like(tp), where=(actual + predicted) > 0)
    return recall, f1, actual > 0


def _mean_over_present(values: np.ndarray, present: np.ndarray):
    count = present.sum(axis=-1)
    total = np.where(present, values, 0.0).sum(axis=-1)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def balanced_accuracy(confusion):
    """Mean recall over the classes present (rows with support); 0.0 for an empty matrix. A float for one matrix,
    an array for a stack."""
    recall, _, present = _per_class(confusion)
    out = _mean_over_present(recall, present)
    return float(out) if np.ndim(out) == 0 else out


def macro_f1(confusion):
    """Mean F1 over the classes present (rows with support); 0.0 for an empty matrix."""
    _, f1, present = _per_class(confusion)
    out = _mean_over_present(f1, present)
    return float(out) if np.ndim(out) == 0 else out


def metrics_from_probs(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """All evaluation numbers from predicted probabilities and true labels (pure numpy; see the module docstring for
    the classes balanced accuracy and macro-F1 average over)."""
    labels = np.asarray(labels).astype(np.int64)
    num_classes = len(classes)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    out = {
        "samples": int(labels.size),
        "accuracy": float((predicted == labels).mean()) if labels.size else 0.0,
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(labels.size), labels], 1e-7, 1.0)))),
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes >= 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=1).mean())
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        predicted_i = int(confusion[:, i].sum())
        actual_i = int(confusion[i, :].sum())
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual_i}
    out["per_class"] = per_class
    out["balanced_accuracy"] = balanced_accuracy(confusion)
    out["macro_f1"] = macro_f1(confusion)
    out["classes_in_split"] = int((confusion.sum(axis=1) > 0).sum())  # what the two averages run over
    return out


def predict_probs(model, dataset) -> np.ndarray:
    """Class probabilities for every sample of a batched (images, labels) dataset, in order."""
    return np.asarray(model.predict(dataset.map(lambda x, y: x), verbose=0))


def pad_to_batches(split, batch_size: int):
    """``split`` (pixels or files) with its first samples repeated at the end so every batch is full."""
    n = len(split.y)
    if n % batch_size == 0:
        return split
    index = np.arange(-(-n // batch_size) * batch_size) % n
    return split.take(index)


def evaluate(model, split, classes: list[str], batch_size: int, pad_batches: bool = False) -> dict:
    """Evaluate ``model`` on a data split and return the evaluation dict (see :func:`metrics_from_probs`).

    ``pad_batches`` fills the last batch with repeats (predictions trimmed afterwards): replicas of a
    distributed model need equal shares of every batch.
    """
    from transfer.data import make_pipeline

    n = len(split.y)
    if pad_batches:
        split = pad_to_batches(split, batch_size)
    dataset = make_pipeline(split, batch_size=batch_size, training=False)
    probs, labels = predict_probs(model, dataset)[:n], split.y[:n]
    if split.streamed:  # a file that failed to decode mid-run was replaced in the pipeline: leave it out here
        readable = ~split.failed()[:n]
        probs, labels = probs[readable], labels[readable]
    return metrics_from_probs(probs, labels, classes)
