"""``transfer bench``: load time, latency percentiles and throughput of every artifact in an export directory."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.card import write_card
from export.contract import BENCH, FAILED_EXPORT, FILE_KEY, SIZE_KEY, STATUS_KEY, ExportDir, Untrusted
from export.formats import FORMATS
from transfer import rundir
from transfer.config import BenchConfig

BATCH_SIZES = (1, 32)


def set_tf_threads(threads: int) -> int | None:
    """Fix TensorFlow's thread pools (possible only before TF runs its first op); returns the count in force."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already started: report what it runs with instead
        pass
    return tf.config.threading.get_intra_op_parallelism_threads() or None


def sample_batch(shape, batch: int, seed: int = 0) -> np.ndarray:
    """Random raw pixels (0..255 float32) of the model's native input shape."""
    return np.random.default_rng(seed).integers(0, 256, (batch, *shape)).astype(np.float32)


def latency(predict: Callable, batch: np.ndarray, iterations: int, warmup: int) -> dict:
    """p50/p90/p99 latency in milliseconds and throughput in images per second of ``predict(batch)``."""
    for _ in range(warmup):
        predict(batch)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_ips": len(batch) / (p50 / 1000) if p50 else None, "iterations": iterations}


def bench(export_dir: Path, settings: BenchConfig | None = None) -> dict:
    """Benchmark every format recorded in ``export_dir``; writes and returns ``bench.json``'s content."""
    settings = settings or BenchConfig()
    threads, iterations, warmup = settings.threads, settings.iterations, settings.warmup
    export = ExportDir.open(export_dir, check_name=False)
    tf_threads = set_tf_threads(threads)
    verification = export.verification()
    shape = list(export.input_shape)
    results = {}
    for name, entry in export.formats().items():
        row = FORMATS.get(name)
        result = {FILE_KEY: entry.get(FILE_KEY), STATUS_KEY: entry.get(STATUS_KEY), SIZE_KEY: entry.get(SIZE_KEY),
                  "accuracy": verification.get(name, {}).get("accuracy"),
                  "threads": tf_threads if row is not None and row.runtime.process_wide_threads else threads}
        results[name] = result
        if row is None or entry.get(STATUS_KEY) == FAILED_EXPORT or not export.path_of(name).exists():
            continue
        try:  # only an artifact whose sha256 the manifest lists is loaded: from the very bytes that were hashed
            artifact = export.read_artifact(name)
        except Untrusted as refused:
            result["error"] = f"not loaded: {refused}"
            print(f"bench: {name} not loaded: {refused}", file=sys.stderr, flush=True)
            continue
        print(f"bench: {name}", flush=True)
        t0 = time.perf_counter()
        predictor = row.load(artifact, num_threads=threads)
        predictor(sample_batch(shape, 1))
        result["load_seconds"] = time.perf_counter() - t0
        for batch in BATCH_SIZES:
            result[f"batch{batch}"] = latency(predictor, sample_batch(shape, batch, seed=batch),
                                              iterations if batch == 1 else max(5, iterations // 4), warmup)
    report = {"export_dir": str(export.path.resolve()), "threads": threads, "tf_intra_op_threads": tf_threads,
              "input_shape": shape, "formats": results}
    rundir.write_json(export.path / BENCH, report)
    write_card(export.path)  # MODEL_CARD.md again, now with the latency table
    return report


def format_table(report: dict) -> str:
    """The bench report as a text table."""
    header = (f"{'format':<16}{'status':<21}{'size MB':>9}{'load s':>8}"
              f"{'b1 p50':>8}{'p90':>7}{'p99':>7}{'b32 p50':>9}{'p90':>8}{'p99':>8}{'img/s':>8}{'acc':>8}")
    lines = [f"threads: {report['threads']} (TensorFlow intra-op: {report['tf_intra_op_threads']}); latency in ms",
             header, "-" * len(header)]
    for name, r in report["formats"].items():
        size = f"{r['size_bytes'] / 1e6:.2f}" if r.get("size_bytes") else "-"
        line = f"{name:<16}{r['status']:<21}{size:>9}"
        if "batch1" in r:
            b1, b32 = r["batch1"], r["batch32"]
            line += (f"{r['load_seconds']:>8.2f}{b1['p50_ms']:>8.2f}{b1['p90_ms']:>7.2f}{b1['p99_ms']:>7.2f}"
                     f"{b32['p50_ms']:>9.2f}{b32['p90_ms']:>8.2f}{b32['p99_ms']:>8.2f}{b32['throughput_ips']:>8.0f}")
        else:
            line += f"{'-':>8}" * 1 + (" (not loaded: sha256)" if r.get("error") else " (not loadable)")
        acc = r.get("accuracy")
        line += f"{acc:>8.4f}" if acc is not None else f"{'-':>8}"
        lines.append(line)
    return "\n".join(lines)
