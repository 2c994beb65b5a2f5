"""Is the input pipeline ever the training bottleneck, and does memory stay flat on folders of any size?

Default (synthetic data): prints, side by side in one run, training images/s of the real ``finetune`` input
pipeline (decode/cache/shuffle/augment/batch/prefetch, one-hot labels) against the compute limit: the same model
stepping on one pre-materialised in-memory batch, same batch size, same ``fit`` loop, the inputs measured alternately.
Ratio = pipeline / compute (median over rounds); the target is >= 0.9. Runs mobilenetv2 at two image sizes, frozen
backbone and ``--unfreeze all``. Beside images/s it prints the CPU time the process spent per image, which a busy
shared machine disturbs less: "compute share" = compute's CPU ms/img over the input's.

``--folders``: generates folders of 256 px JPEGs (10 classes; 1k / 3k / 10k images by default, under /tmp, kept for
the next run) and prints

1. peak RSS (VmHWM) of a whole frozen-backbone run at ``--image-size 160`` (one epoch, evaluation and the run
   directory included), each folder in a fresh subprocess through the real runner (``transfer.runner.execute``),
   beside what the decoded pixels alone would take in memory; the target is growth < 100 MB from 1k to 10k;
2. on the smallest folder at 96 and 160 px, frozen backbone, augmentation none and light: the streamed pipeline
   (Pillow decode in tf.data, no cache), the same with ``--cache DIR`` (filled by the warm-up epoch) and the images
   decoded into RAM up front (pixel arrays, as folders were loaded before they streamed), each against compute.

    python benchmarks/train_throughput.py [--sizes 32 96] [--images 1024] [--batch-size 64] [--augment light]
    python benchmarks/train_throughput.py --folders [--counts 1000 3000 10000] [--folder-sizes 96 160]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FOLDER_ROOT = Path(tempfile.gettempdir()) / "transfer-bench-folders"
CLASSES = 10
SIDE = 256  # pixels of the generated JPEGs


def _images_per_second(model, dataset, steps: int, batch_size: int) -> tuple[float, float]:
    """Images/s of one ``fit`` epoch, and the CPU time this process spent per image (all threads, ms)."""
    gc.collect()  # the last fit's iterator (and its tf.data threads) goes now, not during this measurement
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    images = steps * batch_size
    return images / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / images


def _paired(model, datasets: dict, steps: int, batch_size: int, rounds: int, reference: str) -> dict[str, float]:
    """Measure every dataset of ``datasets`` in turn, ``rounds`` times (after a warm-up of each), so all see the same
    machine noise; returns per dataset the median images/s, the median of its per-round ratios to ``reference``
    (``<name>_ratio``), its best images/s over the reference's best (``<name>_best``: a slow spell of a shared
    machine rarely hits every round) and its median CPU ms per image (``<name>_cpu``)."""
    for dataset in datasets.values():
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)  # warm-up: tracing, caches
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in datasets}
    for _ in range(rounds):
        for name, dataset in datasets.items():
            seen[name].append(_images_per_second(model, dataset, steps, batch_size))
    out = {}
    for name, values in seen.items():
        out[name] = statistics.median(v for v, _ in values)
        out[f"{name}_ratio"] = statistics.median(v / r for (v, _), (r, _) in zip(values, seen[reference], strict=True))
        out[f"{name}_cpu"] = statistics.median(c for _, c in values)
        out[f"{name}_best"] = max(v for v, _ in values) / max(v for v, _ in seen[reference])
    return out


COMPUTE = "in-memory compute"


def _measure(args, variants, sizes, augments) -> list[dict]:
    """One row per size x augment x unfreeze x input: images/s of the run's real training pipeline
    (``runner.training_pipelines``) on each dataset ``variants(size)`` names, and of the compute limit (the same
    model stepping on one in-memory batch), all measured alternately on the same model."""
    import tensorflow as tf

    from transfer.config import AugmentConfig, TrainConfig
    from transfer.freezing import parse_unfreeze
    from transfer.heads import parse_head
    from transfer.model import build_model
    from transfer.runner import training_pipelines
    from transfer.train import compile_model

    train_cfg = TrainConfig(batch_size=args.batch_size)
    rows = []
    for size in sizes:
        inputs = variants(size)
        first = next(iter(inputs.values()))
        steps = len(first.train.y) // args.batch_size
        for augment in augments:
            for unfreeze in args.unfreeze:
                built = build_model(args.backbone, input_shape=first.native_shape, num_classes=len(first.classes),
                                    head=parse_head("default"), image_size=size, weights="none")
                built.set_trainable(parse_unfreeze(unfreeze))
                compile_model(built.model, train_cfg, 1e-3, steps, len(first.classes))
                datasets = {name: training_pipelines(data, AugmentConfig(preset=augment), train_cfg)[0](0)
                            for name, data in inputs.items()}
                x, y = next(iter(next(iter(datasets.values()))))
                datasets[COMPUTE] = tf.data.Dataset.from_tensors((tf.identity(x), tf.identity(y))).repeat()
                speed = _paired(built.model, datasets, steps, args.batch_size, args.repeats, COMPUTE)
                for name in datasets:
                    rows.append({"size": size, "augment": augment, "unfreeze": unfreeze, "steps": steps,
                                 "input": name, "img_s": speed[name], "ratio": speed[f"{name}_ratio"],
                                 "best": speed[f"{name}_best"],
                                 "cpu_ms": speed[f"{name}_cpu"], "cpu_share": speed[f"{COMPUTE}_cpu"] /
                                 speed[f"{name}_cpu"]})
                ratios = ", ".join(f"{n} {speed[f'{n}_ratio']:.2f}" for n in inputs)
                print(f"  measured {args.backbone} {size}px augment {augment} unfreeze {unfreeze}: {ratios}",
                      flush=True)
    return rows


def _print_rows(args, rows: list[dict]) -> None:
    print(f"\n{args.backbone}, batch {args.batch_size}, {args.repeats} alternating rounds (target: ratio >= 0.9)\n"
          f"  img/s, ratio: medians of the rounds (ratio = img/s / in-memory compute img/s in the same round); "
          f"best: best img/s / compute's best img/s\n"
          f"  CPU ms/img: this process's CPU time (all threads) per image, median; compute share: in-memory compute's "
          f"CPU ms/img / this input's (the ratio if compute kept every core busy)")
    width = max(len(r["input"]) for r in rows)
    print(f"{'size':>5} {'augment':>8} {'unfreeze':>9} {'steps':>6} {'input':<{width}} {'img/s':>8} {'ratio':>6} "
          f"{'best':>5} {'CPU ms/img':>11} {'compute share':>14}")
    for r in rows:
        print(f"{r['size']:>5} {r['augment']:>8} {r['unfreeze']:>9} {r['steps']:>6} {r['input']:<{width}} "
              f"{r['img_s']:>8.1f} {r['ratio']:>6.2f} {r['best']:>5.2f} {r['cpu_ms']:>11.2f} {r['cpu_share']:>14.2f}")


# ---------------------------------------------------------------------------------------------- folders


def make_folder(count: int, root: Path = FOLDER_ROOT) -> Path:
    """``count`` 256 px JPEGs in ``CLASSES`` class folders (each class its own hue, smooth shapes plus grain, so
    files compress like photos: ~20-30 kB); reused when a complete copy is already there."""
    import numpy as np
    from PIL import Image

    folder = root / f"jpeg{count}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    rng = np.random.default_rng(count)
    for i in range(count):
        label = i % CLASSES
        low = rng.uniform(0, 1, (8, 8, 3))
        base = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((SIDE, SIDE), Image.BICUBIC), float)
        hue = np.array([(label * 37) % 256, (label * 91 + 60) % 256, (label * 151 + 120) % 256], float)
        pixels = 0.5 * base + 0.5 * hue + rng.normal(0, 12, (SIDE, SIDE, 3))
        path = folder / f"class{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    done.write_text(str(count))
    return folder


def _rss_child(folder: str, size: int, batch_size: int, augment: str) -> None:
    """One frozen-backbone run (one epoch, evaluation, run directory) on ``folder`` through the real runner; prints
    a JSON line with the peak RSS and the run's timings."""
    from transfer.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from transfer.recipes import finetune_recipe
    from transfer.runner import execute

    data = DataConfig(dataset=f"folder:{folder}", folder_image_size=None)  # decoded at the model's size
    train = TrainConfig(batch_size=batch_size, epochs=1, head_epochs=0, tensorboard=False)
    recipe = finetune_recipe(ModelConfig(backbone="mobilenetv2", weights="none", image_size=size, unfreeze="0"),
                             data.dataset, train.seed)
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as artifacts:
        run = execute(recipe, data, AugmentConfig(preset=augment), train, RunConfig(artifacts=artifacts, name="rss"))
        manifest = json.loads((run / "manifest.json").read_text())
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print("RESULT " + json.dumps({"peak_rss_mb": hwm_kb / 1024, "input": manifest["input"]["shape"],
                                  "train": manifest["dataset"]["sizes"]["train"], **manifest["timings"]}))


def _folders(args) -> None:
    from transfer.config import DataConfig
    from transfer.data import Split, load_dataset

    t0 = time.perf_counter()
    folders = {count: make_folder(count) for count in args.counts}
    print(f"folders of {', '.join(map(str, args.counts))} {SIDE} px JPEGs under {FOLDER_ROOT} "
          f"({time.perf_counter() - t0:.0f}s to make or find)", flush=True)

    rss = []
    for count, folder in folders.items():
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(folder), "--rss-size", str(args.rss_size),
                              "--batch-size", str(args.batch_size), "--augment", args.augment],
                             capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"the run on {folder} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        result = json.loads(lines[0][len("RESULT "):])
        rss.append((count, result))
        print(f"  run on {count} images: peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)

    smallest = min(folders)
    with tempfile.TemporaryDirectory(prefix="transfer-bench-cache-") as cache:

        def variants(size: int) -> dict:
            data = load_dataset(DataConfig(dataset=f"folder:{folders[smallest]}", folder_image_size=None),
                                image_size=size)
            cached = dataclasses.replace(data, train=dataclasses.replace(data.train, cache=cache))
            arrays = dataclasses.replace(data, train=Split(data.train.images(), data.train.y))
            return {"streamed (cache none)": data, "streamed, --cache DIR": cached,
                    "decoded into RAM up front": arrays}

        rows = _measure(args, variants, args.folder_sizes, args.folder_augments)

    print(f"\npeak RSS (VmHWM) of a frozen-backbone run (mobilenetv2, --weights none, --image-size {args.rss_size}, "
          f"1 epoch + evaluation, batch {args.batch_size}, augment {args.augment}), one fresh process per folder")
    print(f"{'images':>7} {'train':>6} {'input':>12} {'load s':>7} {'train s':>8} {'eval s':>7} {'peak RSS MB':>12} "
          f"{'pixels in RAM MB':>17}")
    for count, r in rss:
        pixels = count * args.rss_size * args.rss_size * 3 / 2**20
        shape = "x".join(map(str, r["input"]))
        print(f"{count:>7} {r['train']:>6} {shape:>12} {r['data_seconds']:>7.1f} {r['train_seconds']:>8.1f} "
              f"{r['eval_seconds']:>7.1f} {r['peak_rss_mb']:>12.0f} {pixels:>17.0f}")
    growth = rss[-1][1]["peak_rss_mb"] - rss[0][1]["peak_rss_mb"]
    print(f"growth from {rss[0][0]} to {rss[-1][0]} images: {growth:+.0f} MB (target < 100 MB); 'pixels in RAM' is "
          f"what the decoded uint8 images alone would take if held in memory")
    print(f"\npipeline vs compute on the {smallest}-image folder ({SIDE} px JPEGs decoded at each size)")
    _print_rows(args, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="light")
    parser.add_argument("--repeats", type=int, default=5, help="alternating measurement rounds (median reported)")
    parser.add_argument("--folders", action="store_true", help="measure folders of JPEGs instead of synthetic data")
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 3000, 10000], help="folder sizes (images)")
    parser.add_argument("--folder-sizes", type=int, nargs="+", default=[96, 160], help="image sizes of the ratio")
    parser.add_argument("--folder-augments", nargs="+", default=["none", "light"],
                        help="augment presets of the folder ratio")
    parser.add_argument("--unfreeze", nargs="+", default=None,
                        help="unfreeze settings measured (default: 0 all; folders: 0, the cheapest compute)")
    parser.add_argument("--rss-size", type=int, default=160, help="--image-size of the peak-RSS runs")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # Keras, about tf.data input it never shuffles

    if args.unfreeze is None:
        args.unfreeze = ["0"] if args.folders else ["0", "all"]
    if args.rss_child:
        _rss_child(args.rss_child, args.rss_size, args.batch_size, args.augment)
        return
    if args.folders:
        _folders(args)
        return

    from transfer.config import DataConfig
    from transfer.data import load_dataset

    synthetic = load_dataset(DataConfig(synthetic_train=args.images, synthetic_test=10, val_split=0.1))
    _print_rows(args, _measure(args, lambda size: {"synthetic": synthetic}, args.sizes, [args.augment]))


if __name__ == "__main__":
    main()
