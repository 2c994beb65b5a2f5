"""Does ``--class-weight balanced`` help on an imbalanced real folder? Side by side, same seeds, same split.

    python benchmarks/class_weight_study.py [--seeds 3] [--epochs 10] [--model vgg1] [--keep-rare 0.1] [--out DIR]

The folder comes from scikit-learn's ``digits`` (1,797 real 8x8 handwritten digits, upscaled to 32x32 PNGs):
a balanced ``test/`` of 40 images per class is held out first; ``train/`` keeps every other image of digits 0-4 and
only ``--keep-rare`` of digits 5-9 (10 %: about 140 vs 14 per class). Each seed trains ``transfer baseline --model
MODEL --dataset folder:PATH --augment none --epochs N`` without and with ``--class-weight balanced`` (validation carved
from train/, so it is imbalanced too: early stopping keeps the best unweighted val_accuracy, as in every run). Prints
per run the test balanced accuracy with its 95 % bootstrap interval (transfer.compare.stats.bootstrap, 1,000 resamples
of the 400 test images), accuracy, macro-F1 and the mean recall of the rare digits 5-9. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TEST_PER_CLASS = 40
RARE = range(5, 10)


def make_folder(root: Path, keep_rare: float, seed: int = 0) -> dict:
    """Write the imbalanced digits folder (train/ and a balanced test/); returns the train/test counts per class."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": {}, "test": {}}
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        test, train = index[:TEST_PER_CLASS], index[TEST_PER_CLASS:]
        if label in RARE:
            train = train[: max(1, round(len(train) * keep_rare))]
        for split, chosen in (("train", train), ("test", test)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).convert("RGB").save(folder / f"{i}.png")
            counts[split][label] = len(chosen)
    return counts


def train_once(folder: Path, artifacts: Path, model: str, epochs: int, seed: int, weighting: str) -> dict:
    from transfer.cli import main

    name = f"{model}-{weighting}-s{seed}"
    code = main(["baseline", "--model", model, "--dataset", f"folder:{folder}", "--augment", "none", "--epochs",
                 str(epochs), "--seed", str(seed), "--class-weight", weighting, "--no-tensorboard",
                 "--artifacts", str(artifacts), "--name", name])
    if code:
        sys.exit(f"training {name} failed with exit code {code}")
    return json.loads((artifacts / "runs" / name / "evaluation.json").read_text())


def summarise(evaluation: dict) -> dict:
    from transfer.compare.stats import bootstrap

    confusion = evaluation["confusion_matrix"]
    present = sum(1 for row in confusion if sum(row))
    boot = bootstrap(confusion, "balanced_accuracy", 1 / present)
    rare = [evaluation["per_class"][str(c)]["recall"] for c in RARE]
    return {"balanced": evaluation["balanced_accuracy"], "ci": boot["ci95"], "accuracy": evaluation["accuracy"],
            "macro_f1": evaluation["macro_f1"], "rare_recall": statistics.fmean(rare)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="vgg1")
    parser.add_argument("--keep-rare", type=float, default=0.10, help="fraction of digits 5-9 train/ keeps")
    parser.add_argument("--out", default="/tmp/class-weight-study")
    args = parser.parse_args()
    out = Path(args.out) / f"keep{args.keep_rare:g}"
    folder = out / "digits-imbalanced"
    if not folder.exists():
        counts = make_folder(folder, args.keep_rare)
        print(f"folder {folder}: train per class {counts['train']}, test per class {counts['test']}")
    results: dict[str, list[dict]] = {"none": [], "balanced": []}
    for seed in range(args.seeds):
        for weighting in results:  # interleaved: machine noise hits both alike (not that it matters here)
            results[weighting].append(summarise(train_once(folder, out / "artifacts", args.model, args.epochs, seed,
                                                           weighting)))

    def pct(x: float) -> str:
        return f"{x * 100:5.1f}"

    print(f"\n{args.model}, {args.epochs} epochs, digits 5-9 kept at {args.keep_rare:g} in train/; test: "
          f"{TEST_PER_CLASS} per class")
    print(f"{'seed':>4}  {'class weight':<12} {'balanced acc [95% bootstrap]':>30} {'accuracy':>9} {'macro-F1':>9}"
          f" {'recall 5-9':>11}")
    for weighting, rows in results.items():
        for seed, r in enumerate(rows):
            print(f"{seed:>4}  {weighting:<12} {pct(r['balanced']):>14} [{pct(r['ci'][0])}, {pct(r['ci'][1])}]"
                  f" {pct(r['accuracy']):>9} {pct(r['macro_f1']):>9} {pct(r['rare_recall']):>11}")
    print()
    for weighting, rows in results.items():
        values = [r["balanced"] for r in rows]
        spread = f" ± {statistics.stdev(values) * 100:.1f}" if len(values) > 1 else ""
        print(f"mean  {weighting:<12} balanced acc {pct(statistics.fmean(values))}{spread} (std over seeds), "
              f"recall 5-9 {pct(statistics.fmean(r['rare_recall'] for r in rows))}")


if __name__ == "__main__":
    main()
