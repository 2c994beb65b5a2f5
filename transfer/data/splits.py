"""Split containers and seeded, stratified splitting: carving val/test out of a split, limit_train, fingerprints.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from transfer.config import DataConfig
from transfer.errors import UserError

# Purposes mixed into the user's seed so that every random draw has its own stream.
SEED_VAL, SEED_TEST, SEED_LIMIT, SEED_SYNTH_TRAIN, SEED_SYNTH_TEST = range(1, 6)


@dataclass
class Split:
    """One split: ``x`` uint8 RGB images (N, H, W, 3) and ``y`` int64 class indices (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A loaded dataset: class names, the three splits, the native image shape and JSON-able provenance."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    native_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A sha256 over name, classes, split sizes, labels and pixels: equal only for identical splits."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        header = {"name": self.name, "classes": self.classes, "sizes": {k: len(s) for k, s in splits.items()}}
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for split in splits.values():
            content = hashlib.sha256(str(split.x.shape).encode())
            content.update(np.ascontiguousarray(split.y, dtype="<i8").data)
            content.update(np.ascontiguousarray(split.x).data)
            digest.update(content.digest())
        return digest.hexdigest()


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder), each <= its weight."""
    if total <= 0 or weights.sum() == 0:
        return np.zeros_like(weights)
    quota = weights * (total / weights.sum())
    share = np.floor(quota).astype(np.int64)
    largest_remainder_first = np.argsort(share - quota, kind="stable")
    share[largest_remainder_first[: max(0, total - int(share.sum()))]] += 1
    return np.minimum(share, weights)


def stratified_pick(
    y: np.ndarray, n: int, seed: int | Sequence[int], *, leave_one: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified choice of about ``n`` indices of ``y``: returns (picked, rest), both sorted.

    Every class present gets at least one pick; with ``leave_one`` at least one of each class stays in ``rest``
    (the caller makes sure every class has two or more samples then).
    """
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    low = np.ones_like(counts)
    high = counts - 1 if leave_one else counts
    n = int(np.clip(n, low.sum(), high.sum()))
    quota = low + _apportion(high - low, n - int(low.sum()))
    picked = np.zeros(len(y), bool)
    for k, q in enumerate(quota):
        picked[rng.permutation(np.flatnonzero(inverse == k))[:q]] = True
    return np.flatnonzero(picked), np.flatnonzero(~picked)


def share(total: int, fraction: float) -> int:
    """How many of ``total`` samples a split of ``fraction`` gets: none for 0, else at least one."""
    return 0 if fraction == 0 else max(1, round(total * fraction))


def take(split: Split, index: np.ndarray) -> Split:
    """The samples of ``split`` at ``index``."""
    return Split(split.x[index], split.y[index])


def carve(split: Split, n: int, seed: tuple[int, int], classes: Sequence[str], what: str) -> tuple[Split, Split]:
    """(rest, carved): about ``n`` samples of ``split`` taken out, stratified, with every class on both sides."""
    if n == 0:
        return split, take(split, np.zeros(0, np.int64))
    counts = np.bincount(split.y, minlength=len(classes))
    for name, count in zip(classes, counts, strict=True):
        if 0 < count < 2:
            raise UserError(
                f"cannot carve a {what} split: class '{name}' has only {count} image left; "
                f"add images or set the {what} fraction to 0"
            )
    picked, rest = stratified_pick(split.y, n, seed, leave_one=True)
    return take(split, rest), take(split, picked)


def assemble(
    name: str,
    classes: Sequence[str],
    splits: dict[str, Split],
    shape: tuple[int, int, int],
    cfg: DataConfig,
    info: dict,
    sources: dict[str, str],
) -> Dataset:
    """The Dataset of a source's three splits: limit_train applied, counts and split provenance recorded in info."""
    train = splits["train"]
    if cfg.limit_train is not None and cfg.limit_train < len(train):
        n_classes = len(np.unique(train.y))
        if cfg.limit_train < n_classes:
            raise UserError(f"limit_train={cfg.limit_train} is smaller than the number of classes ({n_classes})")
        picked, _ = stratified_pick(train.y, cfg.limit_train, (cfg.seed, SEED_LIMIT), leave_one=False)
        train = take(train, picked)
    info = {
        **info,
        "counts": {"train": len(train), "val": len(splits["val"]), "test": len(splits["test"])},
        "split": {
            "seed": cfg.seed,
            "val_split": cfg.val_split,
            "test_split": cfg.test_split,
            "val_source": sources["val"],
            "test_source": sources["test"],
            "limit_train": cfg.limit_train,
        },
    }
    return Dataset(name, list(classes), train, splits["val"], splits["test"], shape, info)
