"""Split containers and seeded, stratified splitting: carving val/test out of a split, limit_train, fingerprints.

A split is anything with ``y`` (int64 labels), ``len``, ``take(index)`` (a sub-split), ``images(index)`` (uint8 pixels
of the samples asked for), ``x`` (all pixels: small splits only), ``content_digest()`` (its part of the dataset
fingerprint) and ``streamed`` (whether pixels come from files as they are read): :class:`Split` holds pixel arrays
(Keras datasets, synthetic), :class:`transfer.data.folders.FileSplit` holds files decoded on demand.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from transfer.config import DataConfig
from transfer.errors import UserError

# Purposes mixed into the user's seed so that every random draw has its own stream.
SEED_VAL, SEED_TEST, SEED_LIMIT, SEED_SYNTH_TRAIN, SEED_SYNTH_TEST = range(1, 6)
# The size files are decoded at for a model that takes any input size (the scratch baselines: their native input,
# the 32x32 of the CIFAR seed documents they come from) when --folder-image-size is not given.
ANY_INPUT_SIZE = 32


@dataclass
class Split:
    """One split: ``x`` uint8 RGB images (N, H, W, 3) and ``y`` int64 class indices (N,)."""

    x: np.ndarray
    y: np.ndarray
    streamed = False  # pixels are in memory

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Split:
        """The samples at ``index``."""
        return Split(self.x[index], self.y[index])

    def images(self, index: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """uint8 pixels of the samples at ``index`` (all when None), at the split's own size."""
        return self.x if index is None else self.x[np.asarray(index, np.int64)]

    def content_digest(self) -> bytes:
        """This split's part of the dataset fingerprint: shape, labels and pixels."""
        content = hashlib.sha256(str(self.x.shape).encode())
        content.update(np.ascontiguousarray(self.y, dtype="<i8").data)
        content.update(np.ascontiguousarray(self.x).data)
        return content.digest()


@dataclass
class Dataset:
    """A loaded dataset: class names, the three splits, the input shape and JSON-able provenance.

    ``native_shape`` is the shape of the splits' images: a Keras dataset's own (a model resizes in-graph), or for a
    folder the size its files are decoded at; None for a folder whose size the model decides (:meth:`for_model`).
    """

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    native_shape: tuple[int, int, int] | None
    info: dict = field(default_factory=dict)

    def for_model(self, image_size: int | None) -> Dataset:
        """The dataset as a model taking ``image_size`` x ``image_size`` images reads it.

        A dataset with a native shape is returned as it is (the model resizes in-graph). Files without one (a
        folder without --folder-image-size) are decoded at the model's input size, so the run's input size (and
        its exported model's) is that size; a model of any input size (None) gets :data:`ANY_INPUT_SIZE`.
        """
        if self.native_shape is not None:
            return self
        if image_size is None:
            return self.decoded_at(ANY_INPUT_SIZE, "the default for models of any input size")
        return self.decoded_at(image_size, "the model's input size")

    def decoded_at(self, size: int, chosen_by: str) -> Dataset:
        """A dataset of files decoded at ``size`` x ``size`` (``chosen_by`` says why, in info["decode"])."""
        splits = {name: getattr(self, name).at_size(size) for name in ("train", "val", "test")}
        decode = {"size": int(size), "chosen_by": chosen_by, "cache": splits["train"].cache}
        return dataclasses.replace(self, **splits, native_shape=(int(size), int(size), 3),
                                   info={**self.info, "decode": decode})

    def fingerprint(self) -> str:
        """A sha256 over name, classes, split sizes, labels and each split's content (pixels; for folders, the
        files' relative paths and content digests, whatever size they are decoded at): equal only for identical
        splits."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        header = {"name": self.name, "classes": self.classes, "sizes": {k: len(s) for k, s in splits.items()}}
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for split in splits.values():
            digest.update(split.content_digest())
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


def take(split, index: np.ndarray):
    """The samples of ``split`` (any split kind) at ``index``."""
    return split.take(index)


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
    shape: tuple[int, int, int] | None,
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
