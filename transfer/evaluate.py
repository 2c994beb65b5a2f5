"""Test-set evaluation: accuracy, top-5, per-class precision/recall and the confusion matrix."""

from __future__ import annotations

import numpy as np


def metrics_from_probs(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """All evaluation numbers from predicted probabilities and true labels (pure numpy)."""
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
    out["macro_f1"] = float(np.mean([v["f1"] for v in per_class.values()]))
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
