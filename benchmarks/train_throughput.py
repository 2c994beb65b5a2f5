"""Is the input pipeline ever the training bottleneck?

Prints, side by side in one run, training images/s of the real ``finetune`` input pipeline (synthetic data,
decode/cache/shuffle/augment/batch/prefetch, one-hot labels) against the compute limit: the same model stepping
on one pre-materialised in-memory batch, same batch size, same ``fit`` loop, the two measured alternately.
Ratio = pipeline / compute (median over rounds); the target is >= 0.9. Runs mobilenetv2 at two image sizes,
frozen backbone and ``--unfreeze all``.

    python benchmarks/train_throughput.py [--sizes 32 96] [--images 1024] [--batch-size 64] [--augment light]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _images_per_second(model, dataset, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch_size / (time.perf_counter() - start)


def _paired_ratio(model, pipeline, in_memory, steps: int, batch_size: int, rounds: int) -> tuple[float, float, float]:
    """Alternate the two measurements ``rounds`` times (after a warm-up of each) so both see the same machine
    noise; returns the median pipeline and in-memory images/s and the median of the per-round ratios."""
    for dataset in (in_memory, pipeline):
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)  # warm-up: tracing, caches
    real, compute = [], []
    for _ in range(rounds):
        compute.append(_images_per_second(model, in_memory, steps, batch_size))
        real.append(_images_per_second(model, pipeline, steps, batch_size))
    ratios = [r / c for r, c in zip(real, compute, strict=True)]
    return statistics.median(real), statistics.median(compute), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="light")
    parser.add_argument("--repeats", type=int, default=5, help="alternating measurement rounds (median reported)")
    args = parser.parse_args()

    import tensorflow as tf

    from transfer.config import AugmentConfig, DataConfig, TrainConfig
    from transfer.data import load_dataset
    from transfer.freezing import parse_unfreeze
    from transfer.heads import parse_head
    from transfer.model import build_model
    from transfer.runner import training_pipelines
    from transfer.train import compile_model

    dataset = load_dataset(DataConfig(synthetic_train=args.images, synthetic_test=10, val_split=0.1))
    train_cfg = TrainConfig(batch_size=args.batch_size)
    steps = len(dataset.train.y) // args.batch_size
    rows = []
    for size in args.sizes:
        for unfreeze in ("0", "all"):
            built = build_model(args.backbone, input_shape=dataset.native_shape, num_classes=len(dataset.classes),
                                head=parse_head("default"), image_size=size, weights="none")
            built.set_trainable(parse_unfreeze(unfreeze))
            compile_model(built.model, train_cfg, 1e-3, steps, len(dataset.classes))
            pipeline, _, _ = training_pipelines(dataset, AugmentConfig(preset=args.augment), train_cfg)
            pipeline = pipeline.repeat()
            x, y = next(iter(pipeline))
            in_memory = tf.data.Dataset.from_tensors((tf.identity(x), tf.identity(y))).repeat()
            real, compute, ratio = _paired_ratio(built.model, pipeline, in_memory, steps, args.batch_size,
                                                 args.repeats)
            rows.append((size, unfreeze, real, compute, ratio))
            print(f"  measured {args.backbone} {size}px unfreeze {unfreeze}: ratio {ratio:.2f}", flush=True)

    print(f"\n{args.backbone}, batch {args.batch_size}, augment {args.augment}, {steps} steps per measurement, "
          f"median of {args.repeats} alternating rounds")
    print(f"{'size':>5} {'unfreeze':>9} {'pipeline img/s':>15} {'in-memory img/s':>16} {'ratio':>6}")
    for size, unfreeze, real, compute, ratio in rows:
        print(f"{size:>5} {unfreeze:>9} {real:>15.1f} {compute:>16.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
