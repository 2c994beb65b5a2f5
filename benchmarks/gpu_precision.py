"""float32 against mixed precision (``--precision``): training images/s side by side, test accuracy and export parity.

Which precisions: on a GPU float32, mixed_float16 (compute capability >= 7.0) and mixed_bfloat16 (>= 8.0); without a
GPU float32 and mixed_bfloat16 (CPUs with avx512_bf16 / amx_bf16), with a line saying so. A precision the machine
cannot train in is skipped with the toolkit's own one-line reason (``transfer.precision.check_device``).

1. Throughput: each precision's model, built by the run's own recipe under its dtype policy and compiled by the
   run's own ``compile_model`` (loss scaling and ``--jit-compile`` as a run gets them), steps on one in-memory batch
   (the input pipeline is not measured): a warm-up epoch of each and one untimed round, then ``--rounds`` rounds of
   ``--steps`` steps, the precisions alternating within each round so they share the machine's noise. Reported:
   median images/s, the median of the per-round ratios to float32, and the best round's images/s.
2. A real run per precision through the CLI (``transfer finetune`` / ``transfer baseline``) on ``--dataset digits``
   (scikit-learn's bundled scans, nothing downloaded): test accuracy of the float32 model.keras, the accuracy of the
   same weights computing in the training precision, training seconds; then ``transfer export --formats onnx,tflite``
   and its verification against the float32 Keras model (status, top-1 agreement, max |diff|).

Defaults (MobileNetV2 from scratch at 32 px, batch 64, 5 rounds of 10 steps, 5 epochs) take a few minutes on two CPU
cores; a shared machine makes the images/s noisy (the alternating rounds and medians only soften that).

    python benchmarks/gpu_precision.py [--model mobilenetv2|vgg3] [--image-size 32] [--batch-size 64]
        [--rounds 5] [--steps 10] [--epochs 5] [--jit-compile] [--precisions float32 mixed_bfloat16] [--no-runs]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASET = "digits"


def _usable(wanted: list[str] | None) -> tuple[list[str], list[tuple[int, int]]]:
    """The precisions to measure here (float32 first) and the GPUs' compute capabilities."""
    from transfer import precision
    from transfer.errors import UserError

    gpus = precision.gpu_capabilities()
    if gpus:
        low = min(gpus)
        print(f"GPU: {len(gpus)} device(s), compute capability {low[0]}.{low[1]}: measuring float32 vs "
              "mixed_float16 and mixed_bfloat16 where the device supports them")
    else:
        flags = sorted(precision.cpu_flags() & set(precision.BF16_CPU_FLAGS))
        print(f"no GPU: measuring CPU float32 vs mixed_bfloat16 only (CPU bf16 flags: {', '.join(flags) or 'none'})")
    names = wanted or (["float32", "mixed_float16", "mixed_bfloat16"] if gpus else ["float32", "mixed_bfloat16"])
    usable = []
    for name in ["float32", *[n for n in names if n != "float32"]]:
        try:
            precision.check_device(name, gpus=gpus)
            usable.append(name)
        except UserError as exc:
            print(f"  skipped {name}: {exc}")
    return usable, gpus


def _recipe(args):
    from transfer.baselines import BaselineConfig, baseline_recipe
    from transfer.config import ModelConfig
    from transfer.recipes import finetune_recipe

    if args.model == "mobilenetv2":
        return finetune_recipe(ModelConfig(backbone="mobilenetv2", weights="none", image_size=args.image_size,
                                           unfreeze="all"), DATASET)
    return baseline_recipe(BaselineConfig(args.model), DATASET)


def _throughput(args, precisions: list[str]) -> dict[str, dict]:
    """Median images/s per precision over alternating rounds, on one in-memory batch."""
    import keras
    import tensorflow as tf

    from transfer import precision
    from transfer.config import DataConfig, TrainConfig
    from transfer.data import load_dataset
    from transfer.train import compile_model

    data = load_dataset(DataConfig(dataset=DATASET))
    recipe = _recipe(args)
    x = data.train.x[: args.batch_size].astype("float32")
    y = keras.utils.to_categorical(data.train.y[: args.batch_size], len(data.classes)).astype("float32")
    batch = tf.data.Dataset.from_tensors((tf.constant(x), tf.constant(y))).repeat()
    models = {}
    for name in precisions:
        keras.utils.set_random_seed(0)
        with precision.dtype_policy(name):
            built = recipe.build(data)
        if built.set_trainable is not None:
            built.set_trainable(built.unfreeze)
        cfg = TrainConfig(precision=name, jit_compile=args.jit_compile, batch_size=args.batch_size)
        compile_model(built.model, cfg, 1e-3, args.steps, len(data.classes))
        t0 = time.perf_counter()
        built.model.fit(batch, epochs=1, steps_per_epoch=args.steps, verbose=0)  # warm-up: tracing, XLA
        models[name] = built.model
        print(f"  built {name}: {precision.compute_dtypes(built.model)}, loss scaling "
              f"{precision.loss_scaling(built.model)}, XLA {bool(built.model.jit_compile)}, warm-up "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    for model in models.values():  # one untimed alternating round: the first fit after the others' builds is slow
        model.fit(batch, epochs=1, steps_per_epoch=args.steps, verbose=0)
    seen: dict[str, list[float]] = {name: [] for name in precisions}
    for r in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(batch, epochs=1, steps_per_epoch=args.steps, verbose=0)
            seen[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.0f} img/s" for n, v in seen.items()),
              flush=True)
    out = {}
    for name, values in seen.items():
        ratios = [v / f for v, f in zip(values, seen["float32"], strict=True)]
        out[name] = {"img_s": statistics.median(values), "ratio": statistics.median(ratios), "best": max(values),
                     "xla": bool(models[name].jit_compile), "loss_scaling": precision.loss_scaling(models[name])}
    return out


def _quiet(argv: list[str]) -> tuple[int, str]:
    """``transfer <argv>`` with its console output captured (returned for a failure message)."""
    from transfer.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


def _run_and_export(args, name: str, artifacts: Path) -> dict:
    """A real training run in precision ``name``, its test accuracy, and its onnx + tflite export's verification."""
    common = ["--dataset", DATASET, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--precision", name, "--artifacts", str(artifacts), "--no-tensorboard", "--augment", "none",
              "--name", f"{args.model}-{name}"]
    if args.jit_compile:
        common.append("--jit-compile")
    if args.model == "mobilenetv2":
        argv = ["finetune", "--backbone", "mobilenetv2", "--weights", "none", "--image-size", str(args.image_size),
                "--unfreeze", "all", "--head-epochs", "0", "--fine-tune-lr", "1e-3", *common]
    else:
        argv = ["baseline", "--model", args.model, *common]
    t0 = time.perf_counter()
    code, text = _quiet(argv)
    if code:
        return {"error": text.strip().splitlines()[-1] if text.strip() else f"exit {code}"}
    run = artifacts / "runs" / f"{args.model}-{name}"
    manifest = json.loads((run / "manifest.json").read_text())
    row = {"test_accuracy": manifest["metrics"]["test_accuracy"],
           "accuracy_in_training_precision": manifest["precision"].get("test_accuracy_in_training_precision"),
           "train_seconds": manifest["timings"]["train_seconds"], "epochs": manifest["metrics"]["epochs_run"],
           "run_seconds": time.perf_counter() - t0}
    out = artifacts / "exports" / run.name
    code, text = _quiet(["export", str(run), "--formats", "onnx,tflite", "--out", str(out)])
    verify = out / "verify.json"
    if not verify.is_file():
        row["export_error"] = text.strip().splitlines()[-1] if text.strip() else f"exit {code}"
        return row
    for fmt, report in json.loads(verify.read_text())["formats"].items():
        row[fmt] = {"status": report["status"], "agreement": report["top1_agreement"],
                    "max_abs_diff": report["max_abs_diff"]}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2",
                        help="mobilenetv2 (from scratch, --image-size) or a baseline name, e.g. vgg3")
    parser.add_argument("--image-size", type=int, default=32, help="mobilenetv2's input size (default: 32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (default: 5)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round (default: 10)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each real run (default: 5)")
    parser.add_argument("--jit-compile", action="store_true", help="every model and run with --jit-compile")
    parser.add_argument("--precisions", nargs="+", choices=("float32", "mixed_float16", "mixed_bfloat16"),
                        help="default: every one this machine supports (float32 always)")
    parser.add_argument("--no-runs", action="store_true", help="throughput only: no training runs, no exports")
    args = parser.parse_args(argv)

    from transfer.cli import quiet_tensorflow

    quiet_tensorflow()
    import keras

    started = time.perf_counter()
    precisions, gpus = _usable(args.precisions)
    print(f"{args.model}" + (f" {args.image_size}px from scratch" if args.model == "mobilenetv2" else "")
          + f" on {DATASET}, batch {args.batch_size}, {args.rounds} alternating rounds of {args.steps} steps"
          + (", --jit-compile" if args.jit_compile else ""), flush=True)
    speed = _throughput(args, precisions)
    runs = {}
    if not args.no_runs:
        with tempfile.TemporaryDirectory(prefix="transfer-precision-") as tmp:
            for name in precisions:
                runs[name] = _run_and_export(args, name, Path(tmp))
                print(f"  run {name}: {json.dumps(runs[name])}", flush=True)
    assert keras.mixed_precision.dtype_policy().name == "float32", "a dtype policy leaked out of a run"

    print(f"\n{'precision':<15} {'XLA':>5} {'loss scale':>10} {'img/s':>8} {'vs fp32':>8} {'best':>8}"
          + ("" if args.no_runs else f" {'test acc':>9} {'in 16-bit':>9} {'train s':>8} {'onnx':>22} {'tflite':>22}"))
    for name in precisions:
        s = speed[name]
        line = (f"{name:<15} {'on' if s['xla'] else 'off':>5} {'yes' if s['loss_scaling'] else 'no':>10} "
                f"{s['img_s']:>8.0f} {s['ratio']:>7.2f}x {s['best']:>8.0f}")
        r = runs.get(name)
        if r is not None and "error" in r:
            line += f"  run failed: {r['error']}"
        elif r is not None:
            mixed = r["accuracy_in_training_precision"]
            line += (f" {r['test_accuracy']:>9.4f} {(f'{mixed:.4f}' if mixed is not None else '-'):>9} "
                     f"{r['train_seconds']:>8.1f}")
            for fmt in ("onnx", "tflite"):
                v = r.get(fmt)
                text = f"{v['status']} {v['agreement']:.3f} {v['max_abs_diff']:.1e}" if v else "-"
                line += f" {text:>22}"
        print(line)
    print("img/s and vs fp32: medians over the rounds (vs fp32 = the median per-round ratio); best: the best round. "
          "test acc: the float32 model.keras; in 16-bit: the same weights computing in the training precision; "
          "onnx/tflite: verification status, top-1 agreement, max |diff| against the float32 Keras model.")
    if not gpus:
        print("CPU numbers: a machine shared with other work makes them noisy; compare the ratio, not the img/s.")
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
