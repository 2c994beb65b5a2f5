"""Does transfer transfer? Pretrained backbones against the same backbones from scratch and the seed baselines, on
real images that ship in packages, at 5, 10, 25 and all training images per class; 3 seeds.

    python benchmarks/transfer_study.py [--part main|recipes|heads|all] [--datasets digits,faces] [--shots 5,10,25,all]
                                        [--seeds 0,1,2] [--out artifacts/reports/transfer_study]

Datasets (the toolkit's own, seeded stratified splits; ``--seed S`` draws split S and its k-per-class subset, the
same for every cell of that seed, so cells are compared on the same test images):
- ``digits``: 1,797 real 8x8 handwritten digit scans (scikit-learn), 10 classes, 180 test / 180 val images.
- ``faces``: 200 real 25x25 photo crops (scikit-image's lfw_subset), face vs not face; 40 % test (80), 10 % val.

Part ``main`` (the transfer table), every cell trained on k images per class, early stopping on the validation split:
- ``lite0-imagenet``, ``vgg16-hed``: the packaged pretrained backbones at their natural 224 px, frozen, with the
  toolkit's default head (``gap,dropout0.2`` + softmax) trained on their features. The backbone is frozen, so its
  features are computed once per image and cached (what ``transfer finetune --unfreeze 0`` computes every epoch);
  the head trains exactly as in a run (Adam 1e-3, batch 32, best validation epoch kept).
- ``lite0-scratch``, ``vgg16-scratch``: the same backbones from random weights, every layer training
  (``transfer finetune --weights none --unfreeze all``) at 32 px: 224 px from scratch costs ~50x more on 2 cores and
  the sources are 8 and 25 px (the quickstart's from-scratch ResNet50V2 used 32 px too).
- ``baseline``: the better (by mean over seeds) of the seed documents' ``vgg1`` and ``vgg3-dropout-bn`` at native
  size (``transfer baseline``): picking the better of two on the test set flatters the scratch side.
Part ``recipes`` (what to unfreeze; defaults from evidence), 10 images per class, 3 seeds, via ``transfer
finetune``: pretrained Lite0 (imagenet) at 224 px on both datasets, pretrained VGG16 (hed) at 96 px on faces (the
seeds' experiment; VGG16 costs ~8x Lite0 per image, too much for digits here), each with head only (``--unfreeze 0``),
the top layers (``4`` for VGG16 as in the seed documents, ``blocks:1`` for Lite0) and ``all`` (3 head epochs first,
then fine-tuning at 1e-4).

Part ``heads`` (the default head and the patience floor): on each dataset at 10 images per class, 3 seeds, the head
on each pretrained backbone's cached features with or without a BatchNorm first, trained with early stopping
(patience 10 epochs) or for a fixed ~480 steps.

Each cell prints test accuracy per seed; the tables give the mean over seeds with a 95 % interval from a paired
bootstrap over the test images of each seed (1,000 resamples; the spread of the seeds is shown as min-max beside
it), and the gain of each pretrained backbone over its scratch twin and over the best baseline as a paired bootstrap
interval. Results are appended to ``results.jsonl`` as cells finish; a re-run skips finished cells. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

SPLITS = {"digits": {}, "faces": {"test_split": 0.4, "val_split": 0.1}}
PRETRAINED = {"lite0-imagenet": ("efficientnet_lite0", "imagenet", 224), "vgg16-hed": ("vgg16", "hed", 224)}
SCRATCH = {"lite0-scratch": "efficientnet_lite0", "vgg16-scratch": "vgg16"}
SCRATCH_SIZE = 32
BASELINES = ("vgg1", "vgg3-dropout-bn")
RECIPES = {  # name: (backbone, weights, size, unfreeze)
    "vgg16-hed-u0": ("vgg16", "hed", 96, "0"), "vgg16-hed-u4": ("vgg16", "hed", 96, "4"),
    "vgg16-hed-all": ("vgg16", "hed", 96, "all"),
    "lite0-u0": ("efficientnet_lite0", "imagenet", 224, "0"),
    "lite0-blocks1": ("efficientnet_lite0", "imagenet", 224, "blocks:1"),
    "lite0-all": ("efficientnet_lite0", "imagenet", 224, "all"),
}
RECIPE_SHOTS = 10
# VGG16 at 96 px costs ~8x Lite0 at 224 per image: its recipes run on the smaller dataset only
RECIPE_PLAN = {"faces": tuple(RECIPES), "digits": ("lite0-u0", "lite0-blocks1", "lite0-all")}
BATCH = 32
PATIENCE = 10  # epochs; never fewer than 100 steps (transfer.train.effective_patience), as in every run
RESAMPLES = 1000


def epochs_for(n_train: int) -> int:
    """About 480 optimizer steps, between 15 and 60 epochs: tiny sets get more epochs, large ones fewer."""
    steps = math.ceil(n_train / BATCH)
    return int(min(60, max(15, math.ceil(480 / steps))))


def dataset(name: str, seed: int, shots: int | None):
    from transfer.config import DataConfig
    from transfer.data import load_dataset

    probe = load_dataset(DataConfig(dataset=name, seed=seed, **SPLITS[name]))
    limit = None if shots is None else shots * len(probe.classes)
    return load_dataset(DataConfig(dataset=name, seed=seed, limit_train=limit, **SPLITS[name])), limit


def split_args(name: str) -> list[str]:
    return [a for key, value in SPLITS[name].items() for a in (f"--{key.replace('_', '-')}", str(value))]


# --- pretrained cells: frozen features, cached per image -----------------------------------------------------------

_FEATURES: dict = {}


def features(key: str, name: str, images: np.ndarray) -> np.ndarray:
    """Frozen-backbone features (global average pooled) of ``images``, cached per image bytes and backbone."""
    store = _FEATURES.setdefault((key, name), {})
    if not store:  # the first call computes every image of the dataset once: seeds and shots reuse them
        from transfer.data.sources import get_source

        everything = np.concatenate([get_source(name).arrays()[0], images])
        return features_of(key, everything, store, images)
    return features_of(key, images, store, images)


def features_of(key: str, todo: np.ndarray, store: dict, images: np.ndarray) -> np.ndarray:
    import keras

    from transfer.backbones import get_backbone

    backbone, weights, size = PRETRAINED[key]
    missing = [i for i, image in enumerate(todo) if image.tobytes() not in store]
    if missing:
        images, wanted = todo, images
        spec = get_backbone(backbone)
        inputs = keras.Input(images.shape[1:])
        x = keras.layers.Resizing(size, size)(inputs)
        x = spec.preprocess()(x)
        x = spec.build(size, weights)(x, training=False)
        model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
        out = model.predict(images[missing].astype("float32"), batch_size=32, verbose=0)
        for i, row in zip(missing, out, strict=True):
            store[images[i].tobytes()] = row
        images = wanted
    return np.stack([store[image.tobytes()] for image in images])


def train_head(key: str, data, seed: int) -> np.ndarray:
    """The default head trained on cached features as a run trains it; returns per-test-image correctness."""
    import keras

    from transfer.config import ModelConfig
    from transfer.heads import parse_head
    from transfer.train import effective_patience

    keras.utils.set_random_seed(seed)
    # the pooled features as 1x1 maps, so the toolkit's own default head (its pooling included) builds on them
    f_train, f_val, f_test = (features(key, data.name, s.x)[:, None, None, :] for s in (data.train, data.val,
                                                                                         data.test))
    inputs = keras.Input(f_train.shape[1:])
    model = keras.Model(inputs, parse_head(ModelConfig().head).build(inputs, len(data.classes)))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    patience = effective_patience(PATIENCE, math.ceil(len(f_train) / BATCH))
    stop = keras.callbacks.EarlyStopping("val_accuracy", patience=patience, restore_best_weights=True)
    model.fit(f_train, data.train.y, validation_data=(f_val, data.val.y), batch_size=BATCH,
              epochs=epochs_for(len(f_train)), callbacks=[stop], verbose=0)
    return model.predict(f_test, verbose=0).argmax(1) == data.test.y


HEAD_VARIANTS = ("es", "fixed", "bn-es", "bn-fixed")  # head with/without BatchNorm x early stopping / ~480 steps


def head_variant(key: str, data, seed: int, variant: str) -> np.ndarray:
    """Part ``heads``: the head on cached features, ``bn`` (a BatchNorm before dropout) or not, trained with early
    stopping (patience 10 epochs, best validation epoch kept) or for a fixed ~480 steps; per-test-image correctness.
    The evidence behind the default head and the 100-step patience floor."""
    import keras

    keras.utils.set_random_seed(seed)
    f_train, f_val, f_test = (features(key, data.name, s.x) for s in (data.train, data.val, data.test))
    inputs = keras.Input(f_train.shape[1:])
    x = keras.layers.BatchNormalization()(inputs) if variant.startswith("bn") else inputs
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(len(data.classes), activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    steps = math.ceil(len(f_train) / BATCH)
    if variant.endswith("fixed"):
        model.fit(f_train, data.train.y, batch_size=BATCH, epochs=math.ceil(480 / steps), verbose=0)
    else:
        stop = keras.callbacks.EarlyStopping("val_accuracy", patience=PATIENCE, restore_best_weights=True)
        model.fit(f_train, data.train.y, validation_data=(f_val, data.val.y), batch_size=BATCH,
                  epochs=epochs_for(len(f_train)), callbacks=[stop], verbose=0)
    return model.predict(f_test, verbose=0).argmax(1) == data.test.y


# --- cells trained by the toolkit's own commands --------------------------------------------------------------------

def run_cli(argv: list[str], data) -> np.ndarray:
    from transfer.cli import main
    from transfer.runmodel import load_run_model

    with tempfile.TemporaryDirectory() as tmp:
        code = main([*argv, "--no-tensorboard", "--artifacts", tmp, "--name", "cell"])
        if code:
            raise SystemExit(f"{' '.join(argv)} exited {code}")
        model = load_run_model(Path(tmp) / "runs" / "cell")
        return model.predict(data.test.x.astype("float32"), batch_size=64, verbose=0).argmax(1) == data.test.y


def common(name: str, seed: int, limit: int | None, epochs: int) -> list[str]:
    return ["--dataset", name, *split_args(name), "--seed", str(seed), "--augment", "none", "--epochs", str(epochs),
            "--batch-size", str(BATCH), "--patience", str(PATIENCE), *(["--limit-train", str(limit)] if limit else [])]


def scratch_cell(key: str, name: str, seed: int, limit, data) -> np.ndarray:
    argv = ["finetune", "--backbone", SCRATCH[key], "--weights", "none", "--unfreeze", "all", "--image-size",
            str(SCRATCH_SIZE), "--head-epochs", "0", "--lr", "1e-3", "--fine-tune-lr", "1e-3",
            *common(name, seed, limit, epochs_for(len(data.train.y)))]
    return run_cli(argv, data)


def baseline_cell(model: str, name: str, seed: int, limit, data) -> np.ndarray:
    argv = ["baseline", "--model", model, *common(name, seed, limit, epochs_for(len(data.train.y)))]
    return run_cli(argv, data)


def recipe_cell(key: str, name: str, seed: int, limit, data) -> np.ndarray:
    backbone, weights, size, unfreeze = RECIPES[key]
    head_epochs = 0 if unfreeze == "0" else 3
    argv = ["finetune", "--backbone", backbone, "--weights", weights, "--image-size", str(size), "--unfreeze",
            unfreeze, "--head-epochs", str(head_epochs),
            *common(name, seed, limit, 20 if unfreeze != "0" else 23)]
    return run_cli(argv, data)


# --- statistics and tables ------------------------------------------------------------------------------------------

def paired_interval(a: dict[int, np.ndarray], b: dict[int, np.ndarray] | None = None) -> tuple[float, float, float]:
    """Mean over seeds of accuracy (or of the gain a - b on the same images), with a 95 % bootstrap interval that
    resamples each seed's test images (paired when ``b`` is given)."""
    rng = np.random.default_rng(0)
    seeds = sorted(set(a) & set(b) if b is not None else a)
    diff = {s: a[s].astype(float) - (b[s].astype(float) if b is not None else 0.0) for s in seeds}
    point = float(np.mean([diff[s].mean() for s in seeds]))
    draws = np.zeros(RESAMPLES)
    for s in seeds:
        n = len(diff[s])
        draws += diff[s][rng.integers(0, n, (RESAMPLES, n))].mean(1)
    draws /= len(seeds)
    return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def load_results(path: Path) -> dict:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            results[(row["part"], row["dataset"], row["shots"], row["cell"], row["seed"])] = \
                np.array(row["correct"], dtype=bool)
    return results


def cell_text(per_seed: dict[int, np.ndarray]) -> str:
    mean, low, high = paired_interval(per_seed)
    accs = [v.mean() for v in per_seed.values()]
    return f"{mean * 100:.1f} [{low * 100:.1f}, {high * 100:.1f}] ({min(accs) * 100:.0f}-{max(accs) * 100:.0f})"


def gain_text(a, b) -> str:
    if not a or not b:
        return "—"
    mean, low, high = paired_interval(a, b)
    verdict = "gain" if low > 0 else ("loss" if high < 0 else "tied")
    return f"{mean * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}] {verdict}"


def tables(results: dict, datasets, shots, seeds) -> str:
    lines = []
    for name in datasets:
        lines += [f"\n### {name}: test accuracy %, mean over seeds {seeds} [95 % interval] (min-max over seeds)\n",
                  "| images per class | " + " | ".join([*PRETRAINED, *SCRATCH, "best baseline"]) + " |",
                  "|---" * (len(PRETRAINED) + len(SCRATCH) + 2) + "|"]
        gains = []
        for k in shots:
            def get(cell, k=k, name=name):
                return {s: results[("main", name, k, cell, s)] for s in seeds
                        if ("main", name, k, cell, s) in results}

            base = {m: get(m) for m in BASELINES}
            best = max((m for m in BASELINES if base[m]), key=lambda m: np.mean([v.mean() for v in base[m].values()]),
                       default=None)
            row = [cell_text(get(c)) if get(c) else "—" for c in [*PRETRAINED, *SCRATCH]]
            if all(r == "—" for r in row) and best is None:
                continue  # nothing measured at this size (yet)
            row.append(f"{best}: {cell_text(base[best])}" if best else "—")
            lines.append(f"| {k} | " + " | ".join(row) + " |")
            gains.append(f"| {k} | {gain_text(get('lite0-imagenet'), get('lite0-scratch'))} | "
                         f"{gain_text(get('vgg16-hed'), get('vgg16-scratch'))} | "
                         f"{gain_text(get('lite0-imagenet'), base[best] if best else None)} |")
        if not gains:
            lines = lines[:-3]  # no size measured on this dataset: no table
            continue
        lines += [f"\n{name}: gain in points, paired bootstrap 95 % interval (tied: the interval holds 0)\n",
                  "| images per class | lite0-imagenet - lite0-scratch | vgg16-hed - vgg16-scratch | "
                  "lite0-imagenet - best baseline |", "|---|---|---|---|", *gains]
    for name in datasets:
        heads = {c: {s: results[("heads", name, RECIPE_SHOTS, c, s)] for s in seeds
                     if ("heads", name, RECIPE_SHOTS, c, s) in results}
                 for c in (f"{k}:{v}" for k in PRETRAINED for v in HEAD_VARIANTS)}
        if any(heads.values()):
            lines += [f"\n### the head on frozen features: {name}, {RECIPE_SHOTS} images per class\n",
                      "| backbone:variant (bn = BatchNorm first; es = early stopping, fixed = ~480 steps) | "
                      "test accuracy % |", "|---|---|"]
            lines += [f"| {c} | {cell_text(v)} |" for c, v in heads.items() if v]
    for name in datasets:
        recipe = {c: {s: results[("recipes", name, RECIPE_SHOTS, c, s)] for s in seeds
                      if ("recipes", name, RECIPE_SHOTS, c, s) in results} for c in RECIPE_PLAN[name]}
        if any(recipe.values()):
            lines += [f"\n### what to unfreeze: {name}, {RECIPE_SHOTS} images per class\n",
                      "| recipe | backbone, weights, size, --unfreeze | test accuracy % | vs the same backbone's head "
                      "only, points |", "|---|---|---|---|"]
            for c, v in recipe.items():
                if not v:
                    continue
                head_only = next((recipe[o] for o in recipe if RECIPES[o][0] == RECIPES[c][0]
                                  and RECIPES[o][3] == "0"), None)
                versus = "—" if RECIPES[c][3] == "0" else gain_text(v, head_only)
                lines.append(f"| {c} | {', '.join(map(str, RECIPES[c]))} | {cell_text(v)} | {versus} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("main", "recipes", "heads", "all"), default="all")
    parser.add_argument("--datasets", default="digits,faces")
    parser.add_argument("--shots", default="5,10,25,all")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cells", default="", help="comma-separated subset of cells (default: all of the part)")
    parser.add_argument("--out", default="artifacts/reports/transfer_study")
    parser.add_argument("--tables-only", action="store_true", help="train nothing: print the tables of what is done")
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    shots = [None if s == "all" else int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    results = load_results(path)
    wanted = set(filter(None, args.cells.split(",")))
    jobs = []
    if args.part in ("main", "all"):
        cells = [*PRETRAINED, *SCRATCH, *BASELINES]
        jobs += [("main", name, k, cell, seed) for name in datasets for k in shots for seed in seeds for cell in cells]
    if args.part in ("recipes", "all"):
        jobs += [("recipes", name, RECIPE_SHOTS, cell, seed) for name in datasets for seed in seeds
                 for cell in RECIPE_PLAN[name]]
    if args.part == "heads":
        jobs += [("heads", name, RECIPE_SHOTS, f"{key}:{variant}", seed) for name in datasets for key in PRETRAINED
                 for variant in HEAD_VARIANTS for seed in seeds]
    for part, name, k, cell, seed in jobs:
        key = (part, name, "all" if k is None else k, cell, seed)
        if key in results or (wanted and cell not in wanted) or args.tables_only:
            continue
        data, limit = dataset(name, seed, k)
        started = time.perf_counter()
        if part == "heads":
            backbone_key, variant = cell.split(":")
            correct = head_variant(backbone_key, data, seed, variant)
        elif cell in PRETRAINED:
            correct = train_head(cell, data, seed)
        elif cell in SCRATCH:
            correct = scratch_cell(cell, name, seed, limit, data)
        elif cell in BASELINES:
            correct = baseline_cell(cell, name, seed, limit, data)
        else:
            correct = recipe_cell(cell, name, seed, limit, data)
        seconds = time.perf_counter() - started
        results[key] = correct
        with open(path, "a") as f:
            f.write(json.dumps({"part": part, "dataset": name, "shots": key[2], "cell": cell, "seed": seed,
                                "accuracy": float(correct.mean()), "train_images": len(data.train.y),
                                "seconds": round(seconds, 1), "correct": correct.astype(int).tolist()}) + "\n")
        print(f"[{part}] {name} k={key[2]} {cell} seed {seed}: test accuracy {correct.mean():.4f} "
              f"({len(data.train.y)} training images, {seconds:.0f}s)", flush=True)
    text = tables(results, datasets, ["all" if k is None else k for k in shots], seeds)
    (out / "tables.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
