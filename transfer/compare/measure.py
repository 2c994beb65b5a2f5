"""Measurements of finished runs: batch-1 latency, one leaderboard row per cell, one-split check."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from transfer import rundir
from transfer.compare.matrix import Cell
from transfer.compare.ranking import mean_std
from transfer.errors import UserError
from transfer.evaluate import balanced_accuracy, macro_f1


def measure_latency(model_path: Path, shape: list[int], runs: int = 30, warmup: int = 5, *,
                    trust_hub: bool = False) -> float:
    """Median milliseconds of ``model(x)`` on one native-size image after ``warmup`` calls.

    ``model_path`` is a run's ``model.keras``, loaded by the one safe loader (:func:`transfer.runmodel.load_run_model`;
    ``trust_hub`` is ``--trust-hub-handle``). The call is traced once (``tf.function``), as SavedModel/serving run it:
    eager dispatch would otherwise add a per-layer overhead that punishes deep models for something no deployment pays.
    """
    import numpy as np
    import tensorflow as tf

    from transfer.runmodel import load_run_model

    model_path = Path(model_path)
    if model_path.name != rundir.MODEL:
        raise UserError(f"{model_path} is not a run's {rundir.MODEL}")
    model = load_run_model(model_path.parent, trust_hub=trust_hub)
    call = tf.function(lambda t: model(t, training=False))
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, *shape)).astype("float32"))
    for _ in range(max(warmup, 1)):
        call(x).numpy()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call(x).numpy()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def collect_row(cell: Cell, run_paths: list[Path], latency_runs: int, *, trust_hub: bool = False) -> dict:
    """A leaderboard row from the runs' own manifest.json and evaluation.json (seeds aggregated); ``trust_hub``
    goes to :func:`measure_latency`."""
    manifests = [rundir.load_complete(p) for p in run_paths]
    evaluations = [rundir.read_json(p / rundir.EVALUATION) for p in run_paths]
    accuracy, accuracy_std = mean_std([e["accuracy"] for e in evaluations])
    top5 = [e.get("top5_accuracy") for e in evaluations]
    top5_mean, top5_std = mean_std(top5) if None not in top5 else (None, None)
    first = manifests[0]
    best = max(range(len(run_paths)), key=lambda i: evaluations[i]["accuracy"])
    confusion = evaluations[0]["confusion_matrix"]
    samples = evaluations[0]["samples"]
    # from each run's confusion matrix, so runs evaluated before these metrics existed have them too
    balanced, balanced_std = mean_std([balanced_accuracy(e["confusion_matrix"]) for e in evaluations])
    f1, f1_std = mean_std([macro_f1(e["confusion_matrix"]) for e in evaluations])
    pooled = [[sum(cells) for cells in zip(*rows, strict=True)]
              for rows in zip(*(e["confusion_matrix"] for e in evaluations), strict=True)]
    majority = max(sum(row) for row in confusion) / samples if samples else 0.0
    return {
        "cell": cell.name,
        "kind": cell.kind,
        "model": cell.model,
        "image_size": first["model"].get("image_size"),
        "unfreeze": first["model"].get("unfreeze"),
        "augment": first["config"]["augment"],
        "seeds": [m["config"]["train"]["seed"] for m in manifests],
        "test_accuracy": accuracy,
        "test_accuracy_std": accuracy_std,
        "test_accuracies": [e["accuracy"] for e in evaluations],
        "test_balanced_accuracy": balanced,
        "test_balanced_accuracy_std": balanced_std,
        "test_macro_f1": f1,
        "test_macro_f1_std": f1_std,
        "test_samples": samples,
        "confusion_matrix": pooled,  # summed over seeds: what the bootstrap of the class-averaged metrics resamples
        "chance_accuracy": max(1 / len(confusion), majority),  # guessing, or always naming the largest class
        "top5_accuracy": top5_mean,
        "top5_accuracy_std": top5_std,
        "params": first["model"]["params"],
        "trainable_params": first["model"]["trainable_params"],
        "size_bytes": first["model"]["params"] * 4,  # the deployable float32 weights (what model.onnx holds)
        "model_file_bytes": first["model"]["size_bytes"],
        "train_seconds": statistics.fmean(m["timings"]["train_seconds"] for m in manifests),
        "epochs_run": [m["metrics"]["epochs_run"] for m in manifests],
        "latency_ms": measure_latency(run_paths[0] / rundir.MODEL, first["input"]["shape"], latency_runs,
                                      trust_hub=trust_hub),
        "run_dirs": [str(p) for p in run_paths],
        "best_run": str(run_paths[best]),
        "fingerprint": first["dataset"]["fingerprint"],
        "history": str(run_paths[0] / rundir.HISTORY),
    }


def check_same_data(manifests: dict[str, dict], expected: str | None = None) -> str:
    """All runs must come from one dataset split (same fingerprint); returns that fingerprint."""
    fingerprints = {}
    for name, manifest in manifests.items():
        fingerprints.setdefault(manifest["dataset"]["fingerprint"], []).append(name)
    if expected is not None:
        fingerprints.setdefault(expected, [])
    if len(fingerprints) > 1:
        odd = next(names for fp, names in fingerprints.items() if fp != (expected or next(iter(fingerprints))))
        raise UserError(
            f"run '{odd[0]}' was trained on a different dataset or split than the others (dataset fingerprint "
            "differs); compare runs of one split only: pass --overwrite to retrain or --name NEW for a new report"
        )
    return next(iter(fingerprints))
