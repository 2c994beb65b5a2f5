"""Is the input pipeline ever the training bottleneck, and does memory stay flat on folders of any size?

Default (synthetic data): prints, side by side in one run, training images/s of the real ``finetune`` input
pipeline (decode/cache/shuffle/augment/batch/prefetch, one-hot labels) against the compute limit: the same model
stepping on one pre-materialised in-memory batch, same batch size, same ``fit`` loop, the two measured alternately.
Ratio = pipeline / compute (median over rounds); the target is >= 0.9. Runs mobilenetv2 at two image sizes, frozen
backbone and ``--unfreeze all``.

``--folders``: generates folders of 256 px JPEGs (10 classes; 1k / 3k / 10k images by default, under /tmp, kept for
the next run) and prints

1. peak RSS (VmHWM) of a whole frozen-backbone run at ``--image-size 160`` — one epoch, evaluation and the run
   directory included — each folder size in a fresh subprocess through the real runner (``transfer.runner.execute``),
   next to what the decoded pixels alone would take in memory; the target is growth < 100 MB from 1k to 10k;
2. the streamed folder pipeline's images/s (Pillow decode in tf.data) against in-memory compute, as above, at
   96 px and 160 px; the target is >= 0.9.

    python benchmarks/train_throughput.py [--sizes 32 96] [--images 1024] [--batch-size 64] [--augment light]
    python benchmarks/train_throughput.py --folders [--counts 1000 3000 10000] [--folder-sizes 96 160]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FOLDER_ROOT = Path(tempfile.gettempdir()) / "transfer-bench-folders"
CLASSES = 10
SIDE = 256  # pixels of the generated JPEGs


def _images_per_second(model, dataset, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch_size / (time.perf_counter() - start)


def _paired(model, datasets: dict, steps: int, batch_size: int, rounds: int) -> dict[str, float]:
    """Measure every dataset of ``datasets`` in turn, ``rounds`` times (after a warm-up of each), so all see the same
    machine noise; returns the median images/s of each."""
    for dataset in datasets.values():
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)  # warm-up: tracing, caches
    seen: dict[str, list[float]] = {name: [] for name in datasets}
    for _ in range(rounds):
        for name, dataset in datasets.items():
            seen[name].append(_images_per_second(model, dataset, steps, batch_size))
    return {name: statistics.median(values) for name, values in seen.items()}


def _measure(args, dataset, sizes, augments, label: str, in_ram: bool = False) -> list[dict]:
    """One row per size x augment x unfreeze: images/s of the run's real training pipeline on ``dataset(size)``
    against the compute limit (the same model stepping on one in-memory batch), measured alternately; with
    ``in_ram``, also the same images decoded into memory up front (a Split of pixel arrays, as folders were before
    they streamed) through the same pipeline."""
    import tensorflow as tf

    from transfer.config import AugmentConfig, TrainConfig
    from transfer.data import Split
    from transfer.freezing import parse_unfreeze
    from transfer.heads import parse_head
    from transfer.model import build_model
    from transfer.runner import training_pipelines
    from transfer.train import compile_model

    train_cfg = TrainConfig(batch_size=args.batch_size)
    rows = []
    for size in sizes:
        data = dataset(size)
        steps = len(data.train.y) // args.batch_size
        arrays = None
        if in_ram:
            arrays = dataclasses.replace(data, train=Split(data.train.images(), data.train.y))
        for augment in augments:
            for unfreeze in args.unfreeze:
                built = build_model(args.backbone, input_shape=data.native_shape, num_classes=len(data.classes),
                                    head=parse_head("default"), image_size=size, weights="none")
                built.set_trainable(parse_unfreeze(unfreeze))
                compile_model(built.model, train_cfg, 1e-3, steps, len(data.classes))
                pipeline, _, _ = training_pipelines(data, AugmentConfig(preset=augment), train_cfg)
                datasets = {"pipeline": pipeline.repeat()}
                x, y = next(iter(datasets["pipeline"]))
                datasets["compute"] = tf.data.Dataset.from_tensors((tf.identity(x), tf.identity(y))).repeat()
                if arrays is not None:
                    datasets["in_ram"] = training_pipelines(arrays, AugmentConfig(preset=augment), train_cfg)[0]
                    datasets["in_ram"] = datasets["in_ram"].repeat()
                speed = _paired(built.model, datasets, steps, args.batch_size, args.repeats)
                row = {"data": label, "size": size, "augment": augment, "unfreeze": unfreeze, "steps": steps, **speed}
                rows.append(row)
                print(f"  measured {args.backbone} {label} {size}px augment {augment} unfreeze {unfreeze}: ratio "
                      f"{speed['pipeline'] / speed['compute']:.2f}", flush=True)
    return rows


def _print_rows(args, rows: list[dict]) -> None:
    in_ram = any("in_ram" in row for row in rows)
    print(f"\n{args.backbone}, batch {args.batch_size}, images/s median of {args.repeats} alternating rounds; ratio = "
          f"pipeline / in-memory compute")
    print(f"{'data':>12} {'size':>5} {'augment':>8} {'unfreeze':>9} {'steps':>6} {'pipeline img/s':>15} "
          f"{'in-memory compute img/s':>24} {'ratio':>6}"
          + (f" {'in-RAM arrays img/s':>20} {'ratio':>6}" if in_ram else ""))
    for r in rows:
        line = (f"{r['data']:>12} {r['size']:>5} {r['augment']:>8} {r['unfreeze']:>9} {r['steps']:>6} "
                f"{r['pipeline']:>15.1f} {r['compute']:>24.1f} {r['pipeline'] / r['compute']:>6.2f}")
        if in_ram:
            line += f" {r['in_ram']:>20.1f} {r['in_ram'] / r['compute']:>6.2f}"
        print(line)


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
    from transfer.data import load_dataset

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
    rows = _measure(args, lambda size: load_dataset(DataConfig(dataset=f"folder:{folders[smallest]}",
                                                               folder_image_size=None), image_size=size),
                    args.folder_sizes, args.folder_augments, f"folder {smallest}", in_ram=True)

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
    _print_rows(args, _measure(args, lambda size: synthetic, args.sizes, [args.augment], "synthetic"))


if __name__ == "__main__":
    main()
