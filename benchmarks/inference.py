"""Side-by-side inference ratios of one export: each runtime vs Keras ``predict`` and vs the SavedModel in TensorFlow.

    python benchmarks/inference.py artifacts/exports/<name> [--threads 1] [--iterations 50]

Everything is measured in this one process, same inputs, same thread count, so the ratios compare like with like.
A script, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)

    from export.bench import BATCH_SIZES, latency, sample_batch, set_tf_threads
    from export.contract import EXPORTED, VERIFIED, ExportDir

    export_dir = Path(args.export_dir)
    export = ExportDir.open(export_dir, check_name=False)
    tf_threads = set_tf_threads(args.threads)  # before Keras or TF run anything

    from export.formats import FORMATS
    from transfer.runmodel import load_run_model

    model = load_run_model(export.source_run)
    shape = list(export.input_shape)
    runners = {"keras.predict": lambda b: model.predict(b, verbose=0)}
    sizes = {}
    for name, entry in export.formats().items():
        if entry["status"] in (VERIFIED, EXPORTED) and name in FORMATS:
            runners[name] = FORMATS[name].load(export.path_of(name), num_threads=args.threads)
            sizes[name] = entry["size_bytes"]

    p50 = {}
    for name, run in runners.items():
        for batch in BATCH_SIZES:
            iterations = args.iterations if batch == 1 else max(5, args.iterations // 4)
            p50[name, batch] = latency(run, sample_batch(shape, batch, seed=batch), iterations, args.warmup)["p50_ms"]
            print(f"  measured {name:<16} batch {batch:>2}: p50 {p50[name, batch]:8.2f} ms", file=sys.stderr)

    print(f"\n{export_dir}  input {shape}  threads {args.threads} (TensorFlow intra-op {tf_threads})")
    header = f"{'runtime':<16}" + "".join(
        f"{f'b{b} p50 ms':>12}{f'b{b} /keras':>11}{f'b{b} /savedmodel':>16}" for b in BATCH_SIZES)
    print(header)
    print("-" * len(header))
    for name in runners:
        line = f"{name:<16}"
        for batch in BATCH_SIZES:
            ms = p50[name, batch]
            sm = p50.get(("savedmodel", batch))
            line += f"{ms:>12.2f}{ms / p50['keras.predict', batch]:>11.3f}"
            line += f"{ms / sm:>16.3f}" if sm else f"{'-':>16}"
        print(line)
    ratios = {}
    if "tflite" in sizes and "tflite_int8" in sizes:
        ratios = {"int8/fp32 size": sizes["tflite_int8"] / sizes["tflite"],
                  **{f"int8/fp32 latency b{b}": p50["tflite_int8", b] / p50["tflite", b] for b in BATCH_SIZES}}
    if ("onnx", 1) in p50 and ("savedmodel", 1) in p50:
        ratios["onnx/savedmodel latency b1"] = p50["onnx", 1] / p50["savedmodel", 1]
    for key, value in ratios.items():
        print(f"{key:<28}{value:.3f}")
    print(json.dumps({"p50_ms": {f"{n}@{b}": v for (n, b), v in p50.items()}, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
