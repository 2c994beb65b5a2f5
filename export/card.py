"""MODEL_CARD.md: what an export is, what it learned from, how good it is and how sure, how to run it.

Every fact in the card comes from the export directory (export.contract): ``manifest.json`` (the run's manifest and
the export section), ``evaluation.json`` (per-class test metrics), ``verify.json`` (parity per format) and
``bench.json`` once ``transfer bench`` has run. Nothing is typed by hand: :func:`render` is a pure function of those
files' contents, and :func:`write_card` writes its result atomically. ``transfer export`` writes the card last, in
the staging directory before the swap; ``transfer bench`` and ``transfer verify`` write it again.

No TensorFlow, no NumPy: the card renders in the TF-free serving image too. The test accuracy's interval is the
comparison's Wilson interval (``transfer.compare.stats``, the one home of the statistics).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from export.contract import (
    BENCH,
    CARD,
    CLASS_COUNTS_KEY,
    EVALUATION,
    EXPORTED_AT,
    FAILED_EXPORT,
    FAILED_VERIFICATION,
    FILE_KEY,
    FORMATS_KEY,
    LABELS,
    MANIFEST,
    ONNX_OUTPUT,
    SECTION,
    SIZE_KEY,
    STATUS_KEY,
    VERIFICATION_KEY,
    VERIFIED,
    VERIFY,
    VERSIONS_KEY,
)
from transfer import rundir
from transfer.compare.stats import ALPHA, p_above_chance, wilson_interval

SPLITS = ("train", "val", "test")
# A class is named in the limitations when its test recall is this far (a fraction) below the overall accuracy.
LOW_RECALL_GAP = 0.10
# A format whose name carries one of these is reduced precision (its accuracy loss is reported in the limitations).
_REDUCED = re.compile(r"(fp16|float16|int8|uint8|int4|dynamic|quant)")
DO_NOT_SHIP = "do not ship"
_LISTED_CLASSES = 30  # classes named in a sentence before "and N more"


# ---------------------------------------------------------------------------------------------- formatting


def _pct(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(value) -> str:
    text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """A markdown table; ``align``: one character per column, "l" or "r"."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |",
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


def _names(items: list[str]) -> str:
    shown = [str(i) for i in items[:_LISTED_CLASSES]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _versions(versions: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v) or "—"


def _mb(size) -> str:
    return "—" if not size else f"{size / 1e6:.2f} MB"


def reduced_precision(fmt: str) -> bool:
    """Whether a format stores weights (or computes) below float32: fp16, dynamic-range and int8 variants."""
    return bool(_REDUCED.search(fmt))


# ---------------------------------------------------------------------------------------------- facts


def test_accuracy(manifest: dict, evaluation: dict | None) -> dict | None:
    """The test accuracy as ``correct`` of ``n`` images with its 95 % Wilson interval and half-width (None when the
    manifest records no test accuracy)."""
    accuracy = (manifest.get("metrics") or {}).get("test_accuracy")
    if accuracy is None:
        return None
    n = (evaluation or {}).get("samples") or ((manifest.get("dataset") or {}).get("sizes") or {}).get("test") or 0
    correct = round(accuracy * n)
    low, high = wilson_interval(correct, n)
    return {"accuracy": accuracy, "correct": correct, "n": n, "ci95": (low, high), "half_width": (high - low) / 2}


def class_counts(manifest: dict, evaluation: dict | None) -> dict[str, dict[str, int] | None]:
    """Split -> class -> images: the export's record (it reads the run's dataset when it verifies), the test split
    falling back on evaluation.json's per-class support; None for a split nobody recorded."""
    recorded = (manifest.get(SECTION) or {}).get(CLASS_COUNTS_KEY) or {}
    counts = {split: recorded.get(split) for split in SPLITS}
    per_class = (evaluation or {}).get("per_class") or {}
    if counts["test"] is None and per_class:
        counts["test"] = {c: int((per_class.get(c) or {}).get("support", 0)) for c in manifest.get("classes", [])}
    return counts


def low_recall(manifest: dict, evaluation: dict | None) -> list[tuple[str, float, int]]:
    """(class, recall, test images) of every class with test images whose recall is :data:`LOW_RECALL_GAP` or more
    below the test accuracy, lowest first."""
    accuracy = (manifest.get("metrics") or {}).get("test_accuracy")
    per_class = (evaluation or {}).get("per_class") or {}
    if accuracy is None:
        return []
    low = [(c, m["recall"], int(m.get("support", 0))) for c, m in per_class.items()
           if m.get("support") and m.get("recall") is not None and m["recall"] <= accuracy - LOW_RECALL_GAP + 1e-12]
    return sorted(low, key=lambda item: (item[1], item[0]))


def _report(name: str, entry: dict, reports: dict) -> dict:
    """verify.json's report of a format, else the summary its manifest entry repeats."""
    report = reports.get(name)
    return report if isinstance(report, dict) else (entry.get("verification") or {})


# ---------------------------------------------------------------------------------------------- sections


def _summary(name: str, manifest: dict, accuracy: dict | None) -> list[str]:
    model = manifest.get("model") or {}
    what = f"backbone `{model['backbone']}`" if model.get("backbone") else f"baseline `{model.get('baseline')}`"
    shape = (manifest.get("input") or {}).get("shape") or ["?", "?", 3]
    classes = manifest.get("classes") or []
    dataset = (manifest.get("dataset") or {}).get("name")
    line = f"An image classifier ({what}) for {len(classes)} classes of `{dataset}`, taking {shape[0]}x{shape[1]} RGB."
    if accuracy:
        low, high = accuracy["ci95"]
        line += (f" Test accuracy {_pct(accuracy['accuracy'])} ({accuracy['correct']} of {accuracy['n']} images; "
                 f"95% CI {_pct(low)}–{_pct(high)}).")
    section = manifest.get(SECTION) or {}
    return [f"# Model card: {name}", "",
            f"_Generated from this export's {MANIFEST}, {EVALUATION}, {VERIFY} and {BENCH} by `transfer export` "
            f"(written again by `transfer bench` and `transfer verify`); do not edit, changes are overwritten._", "",
            line, "",
            f"Source run `{manifest.get('name')}` (created {manifest.get('created') or '—'}); "
            f"exported {section.get(EXPORTED_AT) or '—'}.", ""]


def _data(manifest: dict, evaluation: dict | None) -> list[str]:
    dataset = manifest.get("dataset") or {}
    sizes = dataset.get("sizes") or {}
    classes = list(manifest.get("classes") or [])
    weights = manifest.get("class_weight") or {}
    source = weights.get("source") or "none"
    if source == "none":
        weight_text = "none (every class weighs 1)"
    elif source == "balanced":
        weight_text = "balanced (inverse class frequency in the training split)"
    else:
        weight_text = f"from `{weights.get('file')}` (sha256 `{weights.get('sha256')}`)"
    lines = ["## Data", "", *_table(["", ""], [
        ["dataset", f"`{dataset.get('name')}`"],
        ["fingerprint", f"`{dataset.get('fingerprint')}`"],
        ["classes", f"{len(classes)}: {_names(classes)}"],
        ["images", " · ".join(f"{s} {sizes.get(s, '—')}" for s in SPLITS)],
        ["class weights", weight_text],
    ]), ""]
    counts = class_counts(manifest, evaluation)
    weighted = source != "none" and weights.get("weights")
    header = ["class", *SPLITS] + (["weight"] if weighted else [])
    rows = []
    for c in classes:
        row = [c, *((counts[s] or {}).get(c, 0) if counts[s] is not None else None for s in SPLITS)]
        rows.append(row + ([_num(weights["weights"].get(c), 3)] if weighted else []))
    totals = [sum((counts[s] or {}).values()) if counts[s] is not None else None for s in SPLITS]
    rows.append(["**total**", *totals] + ([""] if weighted else []))
    lines += ["Images per class:", "", *_table(header, rows, "lrrr" + ("r" if weighted else "")), ""]
    missing = [s for s in SPLITS if counts[s] is None]
    if missing:
        lines += [f"Per-class counts of {', '.join(missing)} are not recorded (the export did not read the run's "
                  "dataset: exported with --no-verify); `transfer export RUN` records them.", ""]
    return lines


def _recipe(manifest: dict) -> list[str]:
    model = manifest.get("model") or {}
    config = manifest.get("config") or {}
    train = config.get("train") or {}
    metrics = manifest.get("metrics") or {}
    augment = config.get("augment") or {}
    shape = (manifest.get("input") or {}).get("shape") or ["?", "?", 3]
    if model.get("backbone"):
        what = f"backbone `{model['backbone']}` (fine-tuned)"
    else:
        what = f"baseline `{model.get('baseline')}`" + (f": {model['description']}" if model.get("description") else "")
    weights = model.get("weights")
    weights_text = {"none": "none (trained from scratch)", "imagenet": "ImageNet (pretrained backbone)"}.get(
        weights, f"`{weights}`")
    package = model.get("weights_package")
    if package:
        weights_text = (f"`{weights}`: {package.get('trained_on')}; from the package `{package.get('package')}` "
                        f"{package.get('version')} (`{package.get('file')}`, sha256 `{package.get('sha256')}`, "
                        f"licence {package.get('licence')})")
    origin = model.get("weights_source")
    if origin:
        weights_text += (f"; backbone from run `{origin.get('run')}` trained on `{origin.get('dataset')}` "
                         f"(fingerprint `{str(origin.get('dataset_fingerprint'))[:12]}…`)")
    overrides = [f"{k} {v}" for k, v in augment.items() if k != "preset" and v is not None]
    epochs = (f"{metrics.get('epochs_run', '—')} run of {train.get('epochs', '—')} "
              f"(head epochs {train.get('head_epochs', 0)}); best validation accuracy "
              f"{_pct(metrics.get('best_val_accuracy'))} at epoch {metrics.get('best_epoch', '—')}"
              + ("; stopped early" if metrics.get("stopped_early") else ""))
    rows = [
        ["kind", manifest.get("kind") or config.get("kind")],
        ["model", what],
        ["weights", weights_text],
        ["image size", f"input {shape[0]}x{shape[1]}x{shape[2]}; the model works at {model.get('image_size')}px "
                       f"(preprocessing `{model.get('preprocessing')}` inside the model)"],
        ["unfreeze", model.get("unfreeze")],
        ["head", model.get("head")],
        ["parameters", f"{model.get('params', 0):,} ({model.get('trainable_params', 0):,} trainable)"],
        ["epochs", epochs],
        ["learning rates", f"lr {train.get('lr')}, fine-tune lr {train.get('fine_tune_lr')}, schedule "
                           f"{train.get('schedule')}"],
        ["optimizer", f"{train.get('optimizer')}, batch size {train.get('batch_size')}, label smoothing "
                      f"{train.get('label_smoothing')}"],
        ["seed", train.get("seed")],
        ["augmentation", f"preset {augment.get('preset')}" + (f" ({', '.join(overrides)})" if overrides else "")],
        ["libraries (training)", _versions(manifest.get("versions"))],
        ["libraries (export)", _versions((manifest.get(SECTION) or {}).get(VERSIONS_KEY))],
    ]
    return ["## Recipe", "", *_table(["", ""], rows), ""]


def _metrics(manifest: dict, evaluation: dict | None, accuracy: dict | None) -> list[str]:
    metrics = manifest.get("metrics") or {}
    lines = ["## Test metrics", ""]
    if accuracy is None:
        return [*lines, "The source run records no test metrics.", ""]
    classes = manifest.get("classes") or []
    present = (evaluation or {}).get("classes_in_split")
    low, high = accuracy["ci95"]
    lines += [f"On the test split: {accuracy['n']} images"
              + (f" ({present} of {len(classes)} classes present)" if present is not None else "") + ".", "",
              *_table(["metric", "value", "95% interval"], [
                  ["accuracy", f"{_pct(accuracy['accuracy'])} ({accuracy['correct']} of {accuracy['n']})",
                   f"{_pct(low)}–{_pct(high)} (Wilson; ±{accuracy['half_width'] * 100:.1f} points)"],
                  ["balanced accuracy", _pct(metrics.get("test_balanced_accuracy")), None],
                  ["macro-F1", _num(metrics.get("test_macro_f1")), None],
                  ["top-5 accuracy", _pct(metrics.get("test_top5_accuracy")), None],
                  ["loss", _num(metrics.get("test_loss")), None],
                  ["best validation accuracy", _pct(metrics.get("best_val_accuracy")), None],
              ], "lrl"), ""]
    per_class = (evaluation or {}).get("per_class") or {}
    if per_class:
        rows = [[c, int(m.get("support", 0)), _num(m.get("precision")), _num(m.get("recall")), _num(m.get("f1"))]
                for c, m in ((c, per_class.get(c) or {}) for c in classes)]
        lines += ["Per class (test split):", "",
                  *_table(["class", "test images", "precision", "recall", "F1"], rows, "lrrrr"), ""]
    else:
        lines += [f"Per-class metrics: not available (no {EVALUATION} in the export).", ""]
    return lines


def _status_cell(status: str | None) -> str:
    if status == VERIFIED:
        return VERIFIED
    if status == FAILED_VERIFICATION:
        return f"**{FAILED_VERIFICATION}: {DO_NOT_SHIP}**"
    if status == FAILED_EXPORT:
        return f"**{FAILED_EXPORT}** (no file)"
    return f"{status or '—'} (not verified: {DO_NOT_SHIP} unverified)"


def _verification(manifest: dict, verify: dict | None) -> list[str]:
    section = manifest.get(SECTION) or {}
    formats = section.get(FORMATS_KEY) or {}
    reports = (verify or {}).get(FORMATS_KEY) or {}
    lines = ["## Verification", ""]
    if not formats:
        return [*lines, "The export lists no formats.", ""]
    images = (verify or {}).get("images")
    if section.get(VERIFICATION_KEY) != VERIFY and not reports:
        lines += [f"Not verified ({section.get(VERIFICATION_KEY)}): run `transfer verify EXPORT` before shipping "
                  "any artifact.", ""]
    else:
        where = (" (" + ", ".join(f"{k} {v}" for k, v in images.items()) + ")") if images else ""
        lines += [f"Every artifact was run next to the Keras model on the same images{where}: *agree* is top-1 "
                  "agreement on all of them, *decided* on the images the Keras model decides (the floors judge "
                  "those), both with 95% Wilson intervals; accuracy and its loss in points against the Keras model "
                  "are on the labelled test images (exact McNemar p, one-sided). Rules: docs/verification.md.", ""]
    rows, remarks = [], []
    for name, entry in formats.items():
        entry = entry if isinstance(entry, dict) else {}
        r = _report(name, entry, reports)
        status = entry.get(STATUS_KEY)
        if "max_abs_diff" not in r:
            rows.append([name, entry.get(FILE_KEY), _mb(entry.get(SIZE_KEY)), _status_cell(status),
                         None, None, None, None, None, None])
        else:
            a_low, a_high = r.get("agreement_ci95") or (None, None)
            d_low, d_high = r.get("decisive_ci95") or (None, None)
            loss = (f"{r['accuracy_drop'] * 100:+.2f} (p={r['p_value']:.2g})"
                    if r.get("accuracy_drop") is not None and r.get("p_value") is not None
                    and r.get("test_samples", 1) else None)
            rows.append([name, entry.get(FILE_KEY), _mb(entry.get(SIZE_KEY)), _status_cell(status),
                         f"{_pct(r.get('top1_agreement'), 1)} ({_pct(a_low, 1)}–{_pct(a_high, 1)})",
                         f"{_pct(r.get('decisive_agreement'), 1)} ({_pct(d_low, 1)}–{_pct(d_high, 1)}) of "
                         f"{r.get('decisive_samples')}",
                         f"{r['max_abs_diff']:.1e}", f"{r['p99_abs_diff']:.1e}" if "p99_abs_diff" in r else None,
                         _pct(r.get("accuracy"), 2), loss])
        errors = r.get("failures") or ([entry["error"]] if entry.get("error") else [])
        remarks += [f"- {name}: FAILED: {text}" for text in errors]
        remarks += [f"- {name}: note: {text}" for text in r.get("notes") or []]
    lines += _table(["format", "file", "size", "status", "agree (95% CI)", "decided: agree (95% CI)", "max abs diff",
                     "p99 abs diff", "accuracy", "loss pt (McNemar p)"], rows, "lllllrrrrr")
    return [*lines, "", *remarks, *([""] if remarks else [])]


def _bench(bench: dict | None) -> list[str]:
    lines = ["## Benchmark", ""]
    if not bench:
        return [*lines, f"Not benchmarked yet: `transfer bench EXPORT` adds load time, latency and throughput here "
                        f"(and writes {BENCH}).", ""]
    lines += [f"`transfer bench` on {bench.get('threads')} thread(s) (TensorFlow intra-op: "
              f"{bench.get('tf_intra_op_threads')}), random pixels at {bench.get('input_shape')}; latency in ms on "
              "the machine it ran on.", ""]
    rows = []
    for name, r in (bench.get(FORMATS_KEY) or {}).items():
        b1, b32 = r.get("batch1") or {}, r.get("batch32") or {}
        if not b1:
            why = "not loaded: sha256" if r.get("error") else "not loadable"
            rows.append([name, r.get(STATUS_KEY), _mb(r.get(SIZE_KEY)), why, *[None] * 7, _pct(r.get("accuracy"))])
            continue
        ips = b32.get("throughput_ips")
        rows.append([name, r.get(STATUS_KEY), _mb(r.get(SIZE_KEY)), _num(r.get("load_seconds"), 2),
                     *(_num(b1.get(k), 2) for k in ("p50_ms", "p90_ms", "p99_ms")),
                     *(_num(b32.get(k), 2) for k in ("p50_ms", "p90_ms", "p99_ms")),
                     f"{ips:.0f}" if ips else None, _pct(r.get("accuracy"))])
    lines += _table(["format", "status", "size", "load s", "b1 p50", "b1 p90", "b1 p99", "b32 p50", "b32 p90",
                     "b32 p99", "img/s (b32)", "accuracy"], rows, "lllrrrrrrrrr")
    return [*lines, ""]


def _limitations(manifest: dict, evaluation: dict | None, verify: dict | None, accuracy: dict | None) -> list[str]:
    classes = list(manifest.get("classes") or [])
    k = len(classes)
    model = manifest.get("model") or {}
    dataset = manifest.get("dataset") or {}
    sizes = dataset.get("sizes") or {}
    spec = manifest.get("input") or {}
    shape = spec.get("shape") or ["?", "?", 3]
    section = manifest.get(SECTION) or {}
    formats = section.get(FORMATS_KEY) or {}
    reports = (verify or {}).get(FORMATS_KEY) or {}
    bullets = [f"Intended use: classifying images like those of `{dataset.get('name')}` into one of its {k} classes "
               f"({_names(classes)}). It was trained on {sizes.get('train', '—')} images of {k} classes at "
               f"{shape[0]}x{shape[1]} (validated on {sizes.get('val', '—')}, tested on {sizes.get('test', '—')})."]
    if accuracy:
        low, high = accuracy["ci95"]
        bullets.append(f"The test set of {accuracy['n']} images resolves accuracy to about "
                       f"±{accuracy['half_width'] * 100:.1f} points (95% interval {_pct(low)}–{_pct(high)}): "
                       "a difference smaller than that, between models or formats, is not measured here.")
        if k > 1 and accuracy["n"] and p_above_chance(accuracy["correct"], accuracy["n"], 1 / k) >= ALPHA:
            bullets.append(f"**The model is not significantly better than chance** ({_pct(accuracy['accuracy'])} "
                           f"on {accuracy['n']} test images, chance {_pct(1 / k)}): do not use it.")
    low = low_recall(manifest, evaluation)
    per_class = (evaluation or {}).get("per_class") or {}
    if low:
        bullets.append("Classes with low recall (at least "
                       f"{LOW_RECALL_GAP * 100:.0f} points below the accuracy): " + ", ".join(
                           f"{c} ({_pct(r, 1)} of {n} test images)" for c, r, n in low)
                       + ": expect these to be missed more often than the accuracy suggests.")
    elif accuracy and any(m.get("support") and m.get("recall") is not None for m in per_class.values()):
        worst = min((m["recall"], c) for c, m in per_class.items() if m.get("support") and m.get("recall") is not None)
        bullets.append(f"No class's test recall is {LOW_RECALL_GAP * 100:.0f} or more points below the accuracy "
                       f"(lowest: {worst[1]}, {_pct(worst[0], 1)}).")
    supports = [int(m.get("support", 0)) for m in per_class.values()]
    if supports:
        absent = [c for c in classes if not (per_class.get(c) or {}).get("support")]
        fewest, most = min((s for s in supports if s), default=0), max(supports)
        spread = f"{fewest}" if fewest == most else f"{fewest}–{most}"
        bullets.append(f"Per-class figures rest on {spread} test images per class: each is far less certain than the "
                       "overall accuracy."
                       + (f" Not measured at all (no test images): {_names(absent)}." if absent else ""))
    weights = model.get("weights")
    if weights == "none":
        bullets.append("No ImageNet weights: the model was trained from scratch on this dataset alone; it has seen "
                       "nothing else.")
    elif model.get("weights_package"):
        package = model["weights_package"]
        bullets.append(f"The backbone starts from packaged weights ({package.get('trained_on')}; licence "
                       f"{package.get('licence')}), with that data's biases; the numbers above are for "
                       f"`{dataset.get('name')}` only.")
    elif weights == "imagenet":
        bullets.append("The backbone starts from ImageNet weights (with that data's biases); the numbers above are "
                       f"for `{dataset.get('name')}` only.")
    reduced = [(n, reports.get(n) or e.get("verification") or {}) for n, e in formats.items()
               if reduced_precision(n) and isinstance(e, dict) and e.get(STATUS_KEY) == VERIFIED]
    measured = [(n, r) for n, r in reduced if r.get("accuracy_drop") is not None and r.get("test_samples", 1)]
    if measured:
        worst_name, worst = max(measured, key=lambda item: item[1]["accuracy_drop"])
        n_test = worst.get("test_samples") or (verify or {}).get("images", {}).get("test")
        bullets.append(f"Verified reduced-precision formats ({', '.join(n for n, _ in measured)}) lose at most "
                       f"{max(0.0, worst['accuracy_drop']) * 100:.2f} accuracy points against the Keras model "
                       f"(measured on {n_test} labelled test images; largest: {worst_name}, "
                       f"{worst['accuracy_drop'] * 100:+.2f} points, McNemar p={worst.get('p_value', 1.0):.2g}).")
    failed = [n for n, e in formats.items() if isinstance(e, dict) and e.get(STATUS_KEY) != VERIFIED]
    if failed:
        bullets.append(f"**{DO_NOT_SHIP.capitalize()}:** " + ", ".join(
            f"{n} ({(formats[n] or {}).get(STATUS_KEY)})" for n in failed)
                       + ": not verified against the Keras model (see Verification).")
    low_px, high_px = spec.get("range") or (0, 255)
    bullets.append(f"Inputs: {spec.get('color', 'RGB')} pixels {low_px:g}..{high_px:g} as "
                   f"{spec.get('dtype', 'float32')} {spec.get('layout', 'NHWC')} at {shape[0]}x{shape[1]}, "
                   f"resized with {spec.get('resize_interpolation', 'bilinear')} interpolation; no normalisation "
                   "(scaling and preprocessing are inside every artifact). Convert greyscale or RGBA images to RGB "
                   "first (`transfer predict` and `transfer serve` do).")
    bullets.append(f"Out of distribution: the model always answers one of its {k} classes, with probabilities "
                   f"summing to 1; an image unlike the `{dataset.get('name')}` training data (another domain, "
                   "camera or resolution, or an object of none of these classes) gets an answer that may look "
                   "confident and mean nothing. The probabilities were not checked for calibration.")
    return ["## Intended use and limitations", "", *(f"- {b}" for b in bullets), ""]


def _usage(name: str, manifest: dict) -> list[str]:
    formats = (manifest.get(SECTION) or {}).get(FORMATS_KEY) or {}
    shipped = {n: e for n, e in formats.items() if isinstance(e, dict) and e.get(STATUS_KEY) == VERIFIED}
    shape = (manifest.get("input") or {}).get("shape") or ["H", "W", 3]
    lines = ["## How to run it", "", "```bash", f"EXPORT=path/to/{name}   # this directory",
             "transfer predict $EXPORT photo.png --top-k 3",
             "transfer serve $EXPORT --port 8080",
             f"curl -s localhost:8080/v1/models/{name}:classify -H 'Content-Type: image/png' --data-binary @photo.png",
             "```", ""]
    onnx = formats.get("onnx") or {}
    if "onnx" in shipped:
        input_name = ((onnx.get("inputs") or [{}])[0]).get("name") or "image"
        lines += [f"`transfer serve` runs `{onnx.get(FILE_KEY, 'model.onnx')}` on ONNX Runtime (no TensorFlow). "
                  f"With onnxruntime alone: the labels are in its `metadata_props`, its output is named "
                  f"`{ONNX_OUTPUT}`:", "",
                  "```python", "import json", "", "import numpy as np", "import onnxruntime as ort",
                  "from PIL import Image", "",
                  f'session = ort.InferenceSession("{onnx.get(FILE_KEY, "model.onnx")}", '
                  'providers=["CPUExecutionProvider"])',
                  "meta = session.get_modelmeta().custom_metadata_map  # labels, input_shape, preprocessing, ...",
                  f'image = Image.open("photo.png").convert("RGB").resize(({shape[1]}, {shape[0]}), Image.BILINEAR)',
                  f"pixels = np.asarray(image, np.float32)[None]  # [1, {shape[0]}, {shape[1]}, 3] RGB 0..255, "
                  "not normalised",
                  f'(probs,) = session.run(["{ONNX_OUTPUT}"], {{meta["input_name"]: pixels}})  # input '
                  f'"{input_name}"',
                  'print(json.loads(meta["labels"])[int(probs[0].argmax())], float(probs[0].max()))', "```", ""]
    else:
        lines += ["This export has no verified `model.onnx`: `transfer serve` needs one (`transfer export RUN "
                  "--formats onnx`); `transfer predict --format NAME` runs the other formats.", ""]
    tflite = [n for n, e in shipped.items() if str(e.get(FILE_KEY, "")).endswith(".tflite")]
    if tflite:
        files = ", ".join(f"`{shipped[n][FILE_KEY]}`" for n in tflite)
        lines += [f"Mobile: ship one of {files} with `{LABELS}` (line *i* = output *i*; also embedded in the "
                  f".tflite file); feed float32 [1, {shape[0]}, {shape[1]}, 3] RGB 0..255, no normalisation. "
                  "Kotlin and Swift snippets: docs/mobile.md."]
        for n in tflite:
            quantization = shipped[n].get("quantization") or {}
            if shipped[n].get("int8_io") and quantization:
                q_in, q_out = quantization.get("input") or {}, quantization.get("output") or {}
                lines[-1] += (f" `{shipped[n][FILE_KEY]}` takes int8 in and out: q = round(x / {q_in.get('scale')}"
                              f" + {q_in.get('zero_point')}), p = (q - {q_out.get('zero_point')}) * "
                              f"{q_out.get('scale')}.")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------- the card


def render(manifest: dict, *, evaluation: dict | None = None, verify: dict | None = None, bench: dict | None = None,
           name: str | None = None) -> str:
    """MODEL_CARD.md of an export: a pure function of its manifest.json, evaluation.json, verify.json and
    bench.json contents (each but the manifest may be None). ``name``: the export's name (its folder), else the
    run's."""
    name = name or manifest.get("name") or "model"
    accuracy = test_accuracy(manifest, evaluation)
    lines = [*_summary(name, manifest, accuracy), *_data(manifest, evaluation), *_recipe(manifest),
             *_metrics(manifest, evaluation, accuracy), *_verification(manifest, verify), *_bench(bench),
             *_limitations(manifest, evaluation, verify, accuracy), *_usage(name, manifest)]
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_card(export_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Render the card of the export at ``export_dir`` from its files and write it there atomically (readable by
    others as the umask says). ``name``: the export's name (default: the folder's; a staging directory passes its
    destination's). Returns the card's path."""
    export_dir = Path(export_dir)
    manifest = _read(export_dir / MANIFEST)
    if manifest is None:
        raise FileNotFoundError(f"{export_dir / MANIFEST} is missing or unreadable: no card without a manifest")
    text = render(manifest, evaluation=_read(export_dir / EVALUATION), verify=_read(export_dir / VERIFY),
                  bench=_read(export_dir / BENCH), name=name or export_dir.resolve().name)
    path = export_dir / CARD
    rundir.write_text(path, text)
    return path
