"""transfer.evaluate: the metrics of a hand-computed confusion matrix, exactly (pure NumPy, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transfer.data import Split
from transfer.evaluate import metrics_from_probs, pad_to_batches

CLASSES = ["a", "b", "c", "d"]
# true \ predicted   a  b  c  d
CONFUSION = [[2, 1, 0, 0],  # 3 a: 2 right, 1 taken for b
             [0, 1, 0, 0],  # 1 b: right
             [2, 0, 3, 0],  # 5 c: 3 right, 2 taken for a
             [0, 0, 0, 0]]  # d: never seen, never predicted


def _probs_for(confusion: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """One sample per confusion count: 0.7 on the predicted class, 0.1 on each of the three others."""
    labels, probs = [], []
    for true, row in enumerate(confusion):
        for predicted, count in enumerate(row):
            for _ in range(count):
                p = np.full(len(row), 0.1)
                p[predicted] = 0.7
                labels.append(true)
                probs.append(p)
    return np.array(probs), np.array(labels)


def test_metrics_of_a_hand_computed_confusion_matrix():
    probs, labels = _probs_for(CONFUSION)
    out = metrics_from_probs(probs, labels, CLASSES)
    assert out["samples"] == 9 and out["confusion_matrix"] == CONFUSION
    assert out["accuracy"] == pytest.approx(6 / 9)
    assert out["loss"] == pytest.approx(-(6 * math.log(0.7) + 3 * math.log(0.1)) / 9)
    # precision = right / predicted as the class (column), recall = right / of the class (row)
    expected = {
        "a": (2 / 4, 2 / 3, 4 / 7, 3),  # F1 = 2PR / (P + R) = (2/3) / (7/6)
        "b": (1 / 2, 1 / 1, 2 / 3, 1),
        "c": (3 / 3, 3 / 5, 3 / 4, 5),
        "d": (0.0, 0.0, 0.0, 0),  # nothing to divide by: zeros, not NaN
    }
    for name, (precision, recall, f1, support) in expected.items():
        got = out["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision, recall, f1)), name
        assert got["support"] == support
    # d has no test image: both class averages run over the three classes present (d counts neither as 0 nor 1)
    assert out["macro_f1"] == pytest.approx((4 / 7 + 2 / 3 + 3 / 4) / 3)
    assert out["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 3 / 5) / 3) and out["classes_in_split"] == 3
    assert "top5_accuracy" not in out  # fewer than five classes


def test_top5_counts_a_hit_anywhere_in_the_five_most_probable():
    classes = [str(i) for i in range(6)]
    ranking = np.array([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])  # class 0 first ... class 5 last
    probs = np.tile(ranking, (4, 1))
    out = metrics_from_probs(probs, np.array([0, 4, 5, 5]), classes)
    assert out["accuracy"] == pytest.approx(1 / 4)
    assert out["top5_accuracy"] == pytest.approx(2 / 4)  # class 4 is fifth (a hit), class 5 sixth (a miss)


def test_pad_to_batches_repeats_the_first_samples():
    split = Split(np.arange(5)[:, None, None, None].astype(np.uint8), np.arange(5))
    padded = pad_to_batches(split, 4)
    assert padded.y.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and padded.x[:, 0, 0, 0].tolist() == padded.y.tolist()
    assert pad_to_batches(split, 5) is split
