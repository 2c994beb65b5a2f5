"""Parity verification: is an artifact the Keras model it was exported from? (docs/verification.md)

Two questions, each judged with its sample size in mind, so noise never fails an export and a broken artifact does:

1. **Parity** (no labels needed): on up to N images drawn from every split (the test images first, never the int8
   calibration images), how often does the artifact's top-1 class agree with the Keras model's, with a 95 % Wilson
   interval, and how far apart are the probabilities (max, mean and p99 of |diff|)? The floor is judged on the images
   the Keras model *decides* (its top-1 probability ahead of the runner-up by at least :data:`DECISIVE_MARGIN`): a near
   tie is no decision to keep or lose. A format fails only when that agreement is *confidently* below the format's
   floor: the whole interval lies below it. Float32 and fp16 formats also bound |diff|.
2. **Accuracy** (the labelled test images among them): the artifact's loss against the Keras model on the same images,
   judged with the exact McNemar test on the discordant pairs: a loss fails only when it is larger than the format
   allows *and* significant (one-sided p < 0.05).

The rules' numbers are columns of the format table (``export.formats.Thresholds``); the proportion statistics
(Wilson interval, exact binomial tail) are the comparison's own (``transfer.compare.stats``). A dataset split's
pixels are read in one function, :func:`split_pixels`.

A Keras model that is no better than chance on its test images has no decisions an artifact could keep or lose: its
verdicts stand, and a note says the model itself needs training more (``reference_above_chance``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from export.formats import Thresholds
from transfer.compare.stats import ALPHA, binomial_sf, p_above_chance, wilson_interval

UNLABELLED = -1  # label of an image used for parity only
SEED_PARITY = 11  # mixed into the run's seed: the parity draw has its own random stream
# An image the Keras model decides: its top-1 probability is ahead of the runner-up by at least this much. A barely
# trained model's near-uniform outputs are not decisions: quantization flips them at will (int8 of a model at 32 %
# accuracy agreed on 39 % of all images and on 100 % of those it decides, docs/verification.md).
DECISIVE_MARGIN = 0.1


# ---------------------------------------------------------------------------------------------- statistics


def binomial_tail(k: int, n: int) -> float:
    """P[X >= k] for X ~ Binomial(n, 1/2): the exact McNemar tail (transfer.compare.stats.binomial_sf)."""
    return binomial_sf(k, n, 0.5)


def mcnemar(reference_correct, candidate_correct) -> dict:
    """The paired comparison of two classifiers on the same labelled images.

    ``lost``: images the reference gets right and the candidate wrong; ``gained``: the reverse. Under "no loss" each
    discordant image is lost or gained with probability 1/2, so the one-sided exact p-value of a loss is
    P[Binomial(lost + gained, 1/2) >= lost]. ``accuracy_drop`` is (lost - gained) / n, the difference of the two
    accuracies.
    """
    ref = np.asarray(reference_correct, bool)
    cand = np.asarray(candidate_correct, bool)
    lost, gained, n = int(np.sum(ref & ~cand)), int(np.sum(~ref & cand)), len(ref)
    return {"test_samples": n, "lost": lost, "gained": gained,
            "accuracy_drop": (lost - gained) / n if n else 0.0, "p_value": binomial_tail(lost, lost + gained)}


# ---------------------------------------------------------------------------------------------- comparing outputs


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Agreement and |diff| statistics of two (n, classes) probability arrays (no labels).

    ``top1_agreement`` over every image, ``decisive_agreement`` over the images the reference decides (top-1 ahead of
    the runner-up by :data:`DECISIVE_MARGIN`), each with its 95 % Wilson interval. ``max_abs_diff``: over every image
    and class; ``median_tv``: the median over images of the total-variation distance between the two probability
    vectors (half the sum of |diff|: 0 = the same, 1 = disjoint; unlike a mean over classes it does not shrink with
    the number of classes, and unlike a maximum a few flipped near-ties do not move it); ``mean_abs_diff``: over
    every image and class; ``p99_abs_diff``: the 99th percentile over images of each
    image's largest |diff|.
    """
    ref = np.asarray(reference, np.float64)
    cand = np.nan_to_num(np.asarray(candidate, np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    n = len(ref)
    agree = ref.argmax(1) == cand.argmax(1) if n else np.zeros(0, bool)
    top2 = np.sort(ref, axis=1)[:, -2:] if n and ref.shape[1] > 1 else np.zeros((n, 2))
    decided = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
    diff = np.abs(ref - cand)
    per_image = diff.max(axis=1) if diff.size else np.zeros(0)
    k, m, dk = int(agree.sum()), int(decided.sum()), int((agree & decided).sum())
    return {
        "samples": n,
        "agreements": k,
        "top1_agreement": k / n if n else 1.0,
        "agreement_ci95": list(wilson_interval(k, n)),
        "decisive_samples": m,
        "decisive_agreements": dk,
        "decisive_agreement": dk / m if m else 1.0,
        "decisive_ci95": list(wilson_interval(dk, m)),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "p99_abs_diff": float(np.percentile(per_image, 99)) if per_image.size else 0.0,
        "median_tv": float(np.median(0.5 * diff.sum(axis=1))) if diff.size else 0.0,
    }


def judge(report: dict, thresholds: Thresholds) -> tuple[list[str], list[str]]:
    """(failures, notes) of a report against ``thresholds``: a failure is a confident breach; a note is a shortfall
    within noise (nothing fails on it) worth a second look with more images."""
    failures, notes = [], []
    floor = thresholds.min_top1_agreement
    if floor is not None and report["decisive_agreement"] < floor:
        low, high = report["decisive_ci95"]
        text = (f"top-1 agreement {report['decisive_agreement']:.1%} on the {report['decisive_samples']} images the "
                f"Keras model decides ({report['decisive_agreements']} agree; 95% CI {low:.1%}-{high:.1%})")
        if high < floor:
            failures.append(f"{text} is below the {floor:.0%} floor")
        else:
            notes.append(f"{text} is below the {floor:.0%} floor within noise")
    if thresholds.max_abs_diff is not None and not report["max_abs_diff"] <= thresholds.max_abs_diff:
        failures.append(f"max |diff| {report['max_abs_diff']:.3g} > {thresholds.max_abs_diff:g}")
    if thresholds.max_p99_abs_diff is not None and not report["p99_abs_diff"] <= thresholds.max_p99_abs_diff:
        failures.append(f"p99 |diff| {report['p99_abs_diff']:.3g} > {thresholds.max_p99_abs_diff:g}")
    bound = thresholds.max_median_tv
    if bound is not None and not report.get("median_tv", 0.0) <= bound:
        failures.append(f"median total-variation distance {report['median_tv']:.3g} > {bound:g} (the typical image's "
                        f"probabilities moved further than quantization moves them)")
    allowed = thresholds.max_accuracy_drop
    if allowed is not None and failures:  # a quantized row moved beyond quantization noise
        notes.append("quantization itself moves this model's outputs: usual for a model whose BatchNorm statistics or "
                     "activations have not settled (trained from scratch, few epochs, a low learning rate); train it "
                     "further, or ship the float32 or fp16 artifact")
    if allowed is not None and report.get("test_samples") and report["accuracy_drop"] > allowed + 1e-12:
        text = (f"accuracy {report['accuracy']:.2%} is {report['accuracy_drop'] * 100:.2f} points below the Keras "
                f"model's {report['reference_accuracy']:.2%} on {report['test_samples']} test images "
                f"({report['lost']} lost, {report['gained']} gained; McNemar p={report['p_value']:.2g}; "
                f"allowed {allowed * 100:g} points)")
        if report["p_value"] < ALPHA:
            failures.append(text)
        else:
            notes.append(f"{text}: not significant")
    return failures, notes


def verify(reference_predict, candidate_predict, inputs, labels, thresholds: Thresholds, batch_size: int = 32) -> dict:
    """Compare two models on ``inputs`` and judge the result against ``thresholds``.

    ``reference_predict`` and ``candidate_predict`` are callables ``batch_float32 -> probabilities`` (or arrays of
    probabilities already computed on ``inputs``, so a reference is run once for many candidates). ``labels`` holds
    one class index per input, :data:`UNLABELLED` (-1) for images used only for parity; None: no accuracy check.
    Returns the parity statistics over every input, the paired accuracy comparison over the labelled ones, the
    thresholds, ``passed``, ``failures`` and ``notes``.
    """
    ref = _probabilities(reference_predict, inputs, batch_size)
    cand = _probabilities(candidate_predict, inputs, batch_size)
    if ref.shape != cand.shape:
        return {"passed": False, "failures": [f"output shape {list(cand.shape)} != reference {list(ref.shape)}"],
                "notes": [], "samples": len(ref), "thresholds": thresholds.as_dict()}
    report = parity(ref, cand)
    labels = np.full(len(ref), UNLABELLED, np.int64) if labels is None else np.asarray(labels, np.int64)
    labelled = labels != UNLABELLED
    if labelled.any():
        truth = labels[labelled]
        ref_correct, cand_correct = ref[labelled].argmax(1) == truth, cand[labelled].argmax(1) == truth
        report.update(accuracy=float(cand_correct.mean()), reference_accuracy=float(ref_correct.mean()),
                      **mcnemar(ref_correct, cand_correct))
    else:
        report.update(accuracy=None, reference_accuracy=None, test_samples=0, lost=0, gained=0, accuracy_drop=0.0,
                      p_value=1.0)
    report["thresholds"] = thresholds.as_dict()
    failures, notes = judge(report, thresholds)
    if labelled.any():
        classes = ref.shape[1]
        correct = round(report["reference_accuracy"] * report["test_samples"])
        report["reference_above_chance"] = p_above_chance(correct, report["test_samples"], 1 / classes) < ALPHA
        if not report["reference_above_chance"] and (failures or notes):
            notes.append(f"the Keras model is not significantly better than chance ({report['reference_accuracy']:.1%} "
                         f"on {report['test_samples']} test images, chance {1 / classes:.1%}): its decisions carry no "
                         f"information for an artifact to keep; train it further before judging its exports")
    if not np.all(np.isfinite(cand)):
        failures.insert(0, "non-finite probabilities")
    report.update(passed=not failures, failures=failures, notes=notes)
    return report


def predict_batched(predict: Callable, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``predict`` over ``inputs`` in batches of ``batch_size`` (each cast to float32), concatenated."""
    outputs = [np.asarray(predict(np.asarray(inputs[i:i + batch_size], np.float32)), dtype=np.float32)
               for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def _probabilities(predict, inputs, batch_size) -> np.ndarray:
    if callable(predict):
        return predict_batched(predict, inputs, batch_size)
    return np.asarray(predict, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- the images


def split_pixels(split, index) -> np.ndarray:
    """uint8 (n, H, W, 3) pixels of ``split``'s samples at ``index``: the one place export reads a dataset's images
    (int8 calibration and verification both come through here). A split's ``images(index)`` when it has one (files
    decoded on demand), else its in-memory ``x``."""
    index = np.asarray(index, np.int64)
    images = getattr(split, "images", None)
    return np.asarray(images(index) if callable(images) else split.x[index])


def calibration_index(count: int, n: int, seed: int = 0) -> np.ndarray:
    """Which of ``count`` training images int8 calibration uses: ``n`` of them (all when fewer), seeded, sorted."""
    if count == 0 or n <= 0:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False))


@dataclass
class VerifySet:
    """The images an export is verified on: uint8 pixels, labels (:data:`UNLABELLED` outside the test split) and how
    many came from each split."""

    images: np.ndarray
    labels: np.ndarray
    origin: dict


def verification_set(dataset, samples: int, seed: int = 0, calibrated: int = 0) -> VerifySet:
    """Up to ``samples`` images of ``dataset`` for verification: the test split first (a seeded subset when larger),
    then a seeded draw from validation and training images, never the ``calibrated`` training images int8
    calibration used (:func:`calibration_index` with the same seed)."""
    test = dataset.test
    rng = np.random.default_rng((seed, SEED_PARITY))
    test_index = np.arange(len(test)) if len(test) <= samples else np.sort(rng.choice(len(test), samples, False))
    excluded = np.zeros(len(dataset.train), bool)
    excluded[calibration_index(len(dataset.train), calibrated, seed)] = True
    pool = [("val", i) for i in range(len(dataset.val))] + [("train", i) for i in np.flatnonzero(~excluded)]
    extra = max(0, samples - len(test_index))
    chosen = sorted(pool[i] for i in rng.choice(len(pool), min(extra, len(pool)), replace=False)) if extra else []
    parts, labels, origin = [], [], {"test": len(test_index)}
    if len(test_index):
        parts.append(split_pixels(test, test_index))
        labels.append(np.asarray(test.y)[test_index].astype(np.int64))
    for name in ("val", "train"):
        index = np.array([i for split, i in chosen if split == name], np.int64)
        origin[name] = len(index)
        if len(index):
            parts.append(split_pixels(getattr(dataset, name), index))
            labels.append(np.full(len(index), UNLABELLED, np.int64))
    if not parts:
        return VerifySet(np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64), origin)
    return VerifySet(np.concatenate(parts), np.concatenate(labels), origin)


# ---------------------------------------------------------------------------------------------- the table


def _status_text(r: dict) -> str:
    return "verified" if r.get("passed") else "failed-verification"


def format_table(reports: dict[str, dict]) -> str:
    """The verification reports as a text table, one row per format (failures and notes under their row)."""
    header = (f"{'format':<16}{'status':<21}{'agree':>7}{'decided: agree (95% CI)':>29}{'max|diff|':>10}"
              f"{'p99|diff|':>10}{'accuracy':>9}{'loss pt (p)':>14}")
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        if "max_abs_diff" not in r:
            lines.append(f"{name:<16}{r.get('status') or 'failed':<21}  {'; '.join(r.get('failures', []))}")
            continue
        low, high = r["decisive_ci95"]
        decided = f"{r['decisive_agreement']:.1%} ({low:.1%}-{high:.1%}) {r['decisive_samples']}"
        accuracy = f"{r['accuracy']:.1%}" if r.get("accuracy") is not None else "-"
        loss = f"{r['accuracy_drop'] * 100:+.2f} ({r['p_value']:.2g})" if r.get("test_samples") else "-"
        lines.append(f"{name:<16}{_status_text(r):<21}{r['top1_agreement']:>7.1%}{decided:>29}"
                     f"{r['max_abs_diff']:>10.1e}{r['p99_abs_diff']:>10.1e}{accuracy:>9}{loss:>14}")
        lines += [f"{'':<16}FAILED: {text}" for text in r.get("failures", [])]
        lines += [f"{'':<16}note: {text}" for text in r.get("notes", [])]
    lines.append(f"agree: top-1 agreement on all {_samples(reports)} images; decided: on the images the Keras model "
                 f"decides (top-1 ahead by >= {DECISIVE_MARGIN:g}), which the floors judge")
    return "\n".join(lines)


def _samples(reports: dict[str, dict]) -> str:
    counts = sorted({r["samples"] for r in reports.values() if "samples" in r})
    return "/".join(str(c) for c in counts) or "0"
