"""Same command, same seed, same history on the CPU, with augmentation on (the finetune default is "light")."""

from __future__ import annotations

import csv

from transfer.cli import main

ARGS = ["--dataset", "synthetic", "--synthetic-train", "300", "--synthetic-test", "60", "--epochs", "2",
        "--batch-size", "32", "--augment", "strong", "--no-tensorboard"]


def _history(run):
    with open(run / "history.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_the_same_seed_gives_the_same_history_with_augmentation(tmp_path):
    for name in ("a", "b"):
        assert main(["baseline", "--model", "vgg1", *ARGS, "--artifacts", str(tmp_path), "--name", name]) == 0
    assert main(["baseline", "--model", "vgg1", *ARGS, "--seed", "1", "--artifacts", str(tmp_path),
                 "--name", "other"]) == 0
    first, second, other = (_history(tmp_path / "runs" / n) for n in ("a", "b", "other"))
    assert len(first) == 2 and first == second  # every loss and accuracy, to the last digit
    assert other != first  # and the seed matters
