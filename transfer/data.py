"""Datasets (Keras built-ins, image folders, synthetic shapes), stratified splits, tf.data pipelines, augmentation."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras.src.datasets.cifar import load_batch
from keras.src.utils.file_utils import extract_archive

from transfer.config import _AUG_PRESETS, AugmentConfig, DataConfig  # noqa: F401  (re-exported)
from transfer.errors import UserError, unknown
from transfer.images import DECODE_ERRORS, decode_image

log = logging.getLogger("transfer")

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
SKIPPED_SHOWN = 5  # how many skipped file names the warning and info["skipped"] list

# Purposes mixed into the user's seed so that every random draw has its own stream.
_SEED_VAL, _SEED_TEST, _SEED_LIMIT, _SEED_SYNTH_TRAIN, _SEED_SYNTH_TEST = range(1, 6)

# (x_train, y_train), (x_test, y_test), as the Keras loaders return them.
RawData = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------------
# Data containers
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A registry row: how to get a dataset and what it looks like."""

    name: str
    classes: tuple[str, ...]
    native_shape: tuple[int, int, int]
    load: Callable[[DataConfig], RawData]  # the Keras loader (downloads and caches) or a built-in generator
    origin: str | None = None  # the URL the Keras loader downloads from; None for built-in data
    read_dir: Callable[[Path], tuple[RawData, Path] | None] | None = None  # pre-downloaded copy parser; None if absent
    data_files: tuple[str, ...] = ()  # what read_dir looks for in --data-dir, for messages


def _find_dir(data_dir: Path, folder: str, marker: str) -> Path | None:
    """The extracted ``folder`` in data_dir (or data_dir itself, or Keras's cache layout) holding ``marker``."""
    for candidate in (data_dir, data_dir / folder, data_dir / f"{folder}-target" / folder):
        if (candidate / marker).is_file():
            return candidate
    return None


def _find_file(data_dir: Path, name: str, subdirs: Sequence[str] = ()) -> Path | None:
    """``name`` inside data_dir (or one of its ``subdirs``), or data_dir itself when it is that file."""
    if data_dir.is_file():
        return data_dir if data_dir.name == name else None
    for candidate in (data_dir / name, *(data_dir / sub / name for sub in subdirs)):
        if candidate.is_file():
            return candidate
    return None


def _parse_cifar(batches: Path, train: Sequence[str], test: str, label_key: str) -> RawData:
    """CIFAR pickled batches -> HWC arrays, through Keras's own ``load_batch``."""

    def read(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [load_batch(str(batches / name), label_key=label_key) for name in names]
        x = np.concatenate([data for data, _ in parts]).transpose(0, 2, 3, 1)
        return x, np.concatenate([np.asarray(labels) for _, labels in parts])

    return read(train), read([test])


def _read_cifar(
    data_dir: Path, *, archive: str, folder: str, train: tuple[str, ...], test: str, label_key: str
) -> tuple[RawData, Path] | None:
    """A pre-downloaded CIFAR copy: the extracted batches folder or the .tar.gz (extracted to a temporary dir)."""
    batches = None if data_dir.is_file() else _find_dir(data_dir, folder, train[0])
    if batches is not None:
        return _parse_cifar(batches, train, test, label_key), batches
    tar = _find_file(data_dir, archive)
    if tar is None:
        return None
    # Never extract into the user's directory: a temporary dir is removed once the arrays are in memory.
    with tempfile.TemporaryDirectory(prefix="transfer-data-") as tmp:
        try:
            # A sub-folder, because Keras deletes the extraction target when extraction fails.
            extracted = extract_archive(str(tar), str(Path(tmp) / "x"), archive_format="tar")
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UserError(f"cannot extract {tar}: {e}") from e
        batches = _find_dir(Path(tmp) / "x", folder, train[0]) if extracted else None
        if batches is None:
            raise UserError(f"{tar} is not a CIFAR archive: expected a tar with {folder}/{train[0]} inside")
        return _parse_cifar(batches, train, test, label_key), tar


def _read_mnist(data_dir: Path) -> tuple[RawData, Path] | None:
    """A pre-downloaded mnist.npz, read as the Keras loader reads it."""
    path = _find_file(data_dir, "mnist.npz")
    if path is None:
        return None
    with np.load(path, allow_pickle=False) as f:
        return ((f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])), path


_FASHION_FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)


def _read_fashion_mnist(data_dir: Path) -> tuple[RawData, Path] | None:
    """The four pre-downloaded Fashion-MNIST idx files, read as the Keras loader reads them."""
    paths = [_find_file(data_dir, name, subdirs=("fashion-mnist", "datasets/fashion-mnist")) for name in _FASHION_FILES]
    if any(path is None for path in paths):
        return None

    def read(labels_path: Path, images_path: Path) -> tuple[np.ndarray, np.ndarray]:
        with gzip.open(labels_path, "rb") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)
        with gzip.open(images_path, "rb") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(len(y), 28, 28)
        return x, y

    return (read(paths[0], paths[1]), read(paths[2], paths[3])), paths[0].parent


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SYNTHETIC_CLASSES = (
    "circle", "square", "triangle", "cross", "ring",
    "horizontal_bar", "vertical_bar", "diagonal_line", "diamond", "checker",
)  # fmt: skip
_KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"


def _generate_synthetic(cfg: DataConfig) -> RawData:
    """The synthetic dataset's train and test sets, from two seeds derived from cfg.seed."""
    return (
        synthetic_images(cfg.synthetic_train, seed=(cfg.seed, _SEED_SYNTH_TRAIN)),
        synthetic_images(cfg.synthetic_test, seed=(cfg.seed, _SEED_SYNTH_TEST)),
    )


_DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="cifar10",
            classes=CIFAR10_CLASSES,
            native_shape=(32, 32, 3),
            load=lambda cfg: keras.datasets.cifar10.load_data(),
            origin="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            read_dir=partial(
                _read_cifar,
                archive="cifar-10-python.tar.gz",
                folder="cifar-10-batches-py",
                train=tuple(f"data_batch_{i}" for i in range(1, 6)),
                test="test_batch",
                label_key="labels",
            ),
            data_files=("cifar-10-python.tar.gz", "cifar-10-batches-py/"),
        ),
        DatasetSpec(
            name="cifar100",
            classes=CIFAR100_CLASSES,
            native_shape=(32, 32, 3),
            load=lambda cfg: keras.datasets.cifar100.load_data(label_mode="fine"),
            origin="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            read_dir=partial(
                _read_cifar,
                archive="cifar-100-python.tar.gz",
                folder="cifar-100-python",
                train=("train",),
                test="test",
                label_key="fine_labels",
            ),
            data_files=("cifar-100-python.tar.gz", "cifar-100-python/"),
        ),
        DatasetSpec(
            name="mnist",
            classes=MNIST_CLASSES,
            native_shape=(28, 28, 3),
            load=lambda cfg: keras.datasets.mnist.load_data(),
            origin=f"{_KERAS_ORIGIN}mnist.npz",
            read_dir=_read_mnist,
            data_files=("mnist.npz",),
        ),
        DatasetSpec(
            name="fashion_mnist",
            classes=FASHION_MNIST_CLASSES,
            native_shape=(28, 28, 3),
            load=lambda cfg: keras.datasets.fashion_mnist.load_data(),
            origin=f"{_KERAS_ORIGIN}train-labels-idx1-ubyte.gz",  # the first of the four files Keras fetches
            read_dir=_read_fashion_mnist,
            data_files=(" + ".join(_FASHION_FILES),),
        ),
        DatasetSpec(name="synthetic", classes=SYNTHETIC_CLASSES, native_shape=(32, 32, 3), load=_generate_synthetic),
    )
}


def dataset_names() -> list[str]:
    """The registered dataset names, plus ``folder:PATH`` for a folder of class sub-folders."""
    return [*_DATASETS, f"{FOLDER_PREFIX}PATH"]


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registry row for ``name``; an unknown name raises UserError with the closest match."""
    spec = _DATASETS.get(name.strip().lower())
    if spec is None:
        raise unknown("dataset", name, dataset_names())
    return spec


# ----------------------------------------------------------------------------------------------
# Synthetic shapes
# ----------------------------------------------------------------------------------------------

# Masks over coordinates (u, v) normalised by the shape's radius; v grows downwards.
_SHAPE_MASKS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u**2 + v**2 < 1.0,  # circle
    lambda u, v: np.maximum(abs(u), abs(v)) < 0.8,  # square
    lambda u, v: (v > -0.9) & (v < 0.8) & (abs(u) < (v + 0.9) * 0.6),  # triangle
    lambda u, v: ((abs(u) < 0.3) & (abs(v) < 1.0)) | ((abs(v) < 0.3) & (abs(u) < 1.0)),  # cross
    lambda u, v: (u**2 + v**2 < 1.0) & (u**2 + v**2 > 0.36),  # ring
    lambda u, v: (abs(v) < 0.3) & (abs(u) < 1.1),  # horizontal bar
    lambda u, v: (abs(u) < 0.3) & (abs(v) < 1.1),  # vertical bar
    lambda u, v: (abs(u - v) < 0.4) & (abs(u + v) < 1.6),  # diagonal line
    lambda u, v: abs(u) + abs(v) < 1.0,  # diamond
    lambda u, v: (np.maximum(abs(u), abs(v)) < 1.0) & ((np.floor(u * 2) + np.floor(v * 2)) % 2 == 0),  # checker
)
_SYNTH_SIZE = 32
_SYNTH_CHUNK = 1024  # images generated per vectorised step (bounds memory for large sets)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (each in [0, 1], shape (N,)) to RGB (N, 3) in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def synthetic_images(n: int, seed: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32x32 RGB images of ten coloured shapes on noisy backgrounds, balanced and deterministic by seed.

    A class is its shape and a typical hue (jittered), so both shape and colour features separate the classes.
    """
    rng = np.random.default_rng(seed)
    n_classes = len(_SHAPE_MASKS)
    y = rng.permutation(np.arange(n) % n_classes)
    x = np.empty((n, _SYNTH_SIZE, _SYNTH_SIZE, 3), np.uint8)
    grid = np.arange(_SYNTH_SIZE, dtype=np.float32) + 0.5
    for start in range(0, n, _SYNTH_CHUNK):
        labels = y[start : start + _SYNTH_CHUNK]
        m = len(labels)
        radius = rng.uniform(7.0, 11.0, m).astype(np.float32)[:, None, None]
        cx, cy = (rng.uniform(-4.0, 4.0, (2, m)).astype(np.float32) + _SYNTH_SIZE / 2)[..., None, None]
        angle = rng.uniform(-0.25, 0.25, m).astype(np.float32)[:, None, None]  # about +-15 degrees
        dx, dy = (grid[None, None, :] - cx) / radius, (grid[None, :, None] - cy) / radius
        u, v = np.cos(angle) * dx + np.sin(angle) * dy, np.cos(angle) * dy - np.sin(angle) * dx
        mask = np.zeros((m, _SYNTH_SIZE, _SYNTH_SIZE), bool)
        for k, shape in enumerate(_SHAPE_MASKS):
            chosen = labels == k
            mask[chosen] = shape(u[chosen], v[chosen])
        hue = (labels / n_classes + rng.normal(0.0, 0.02, m)) % 1.0
        colour = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0, m), rng.uniform(0.8, 1.0, m)) * 255
        background = rng.uniform(0.0, 70.0, (m, 1)) + rng.uniform(-15.0, 15.0, (m, 3))  # dark, weakly tinted
        image = np.where(mask[..., None], colour[:, None, None, :], background[:, None, None, :])
        image += rng.normal(0.0, 12.0, image.shape)
        x[start : start + m] = np.clip(image, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Stratified splitting
# ----------------------------------------------------------------------------------------------


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


def _share(total: int, fraction: float) -> int:
    """How many of ``total`` samples a split of ``fraction`` gets: none for 0, else at least one."""
    return 0 if fraction == 0 else max(1, round(total * fraction))


def _carve(split: Split, n: int, seed: tuple[int, int], classes: Sequence[str], what: str) -> tuple[Split, Split]:
    """(rest, carved): about ``n`` samples of ``split`` taken out, stratified, with every class on both sides."""
    if n == 0:
        return split, _take(split, np.zeros(0, np.int64))
    counts = np.bincount(split.y, minlength=len(classes))
    for name, count in zip(classes, counts, strict=True):
        if 0 < count < 2:
            raise UserError(
                f"cannot carve a {what} split: class '{name}' has only {count} image left; "
                f"add images or set the {what} fraction to 0"
            )
    picked, rest = stratified_pick(split.y, n, seed, leave_one=True)
    return _take(split, rest), _take(split, picked)


def _take(split: Split, index: np.ndarray) -> Split:
    return Split(split.x[index], split.y[index])


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------

_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_DECODE_ERRORS = DECODE_ERRORS


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by extension, hidden files and folders ignored)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _try_decode(path: Path, size: int) -> np.ndarray | None:
    try:
        return decode_image(path, size)
    except _DECODE_ERRORS:
        return None


def _read_folder(folder: Path, classes: Sequence[str], size: int, root: Path, skipped: list[str]) -> Split:
    """All readable images of ``folder``/<class>/; unreadable ones are appended (relative to root) to ``skipped``."""
    present = _class_folders(folder)
    strangers = sorted(set(present) - set(classes))
    if strangers:
        raise UserError(f"{folder} has class folders not in the training classes: {', '.join(strangers)}")
    files = [
        (label, path) for label, name in enumerate(classes) if name in present for path in _image_files(folder / name)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow decodes with the GIL released
        images = list(pool.map(lambda item: _try_decode(item[1], size), files))
    readable = np.zeros(len(classes), np.int64)
    for (label, path), image in zip(files, images, strict=True):
        if image is None:
            skipped.append(str(path.relative_to(root)))
        else:
            readable[label] += 1
    for label, name in enumerate(classes):
        if name in present and readable[label] == 0:
            raise UserError(
                f"class '{name}' has no readable images in {folder / name} "
                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    kept = [(label, image) for (label, _), image in zip(files, images, strict=True) if image is not None]
    x = np.stack([image for _, image in kept]) if kept else np.zeros((0, size, size, 3), np.uint8)
    return Split(x, np.array([label for label, _ in kept], np.int64))


def _load_folder(cfg: DataConfig) -> Dataset:
    """A folder of class sub-folders, optionally already split into train/ (val/, test/) sub-folders."""
    given = cfg.dataset[len(FOLDER_PREFIX) :]
    root = Path(given).expanduser()
    if not given or not root.is_dir():
        raise UserError(f"dataset folder '{given}' does not exist or is not a directory")
    root = root.resolve()
    layout = {}
    for split, names in _SPLIT_FOLDERS.items():
        found = next((root / name for name in names if (root / name).is_dir()), None)
        if found is not None:
            layout[split] = found
    if "train" not in layout:  # without train/, "val" or "test" folders are ordinary class folders
        layout = {}
    class_root = layout.get("train", root)
    classes = _class_folders(class_root)
    if not classes:
        raise UserError(f"{class_root} has no class sub-folders; expected one sub-folder of images per class")
    if len(classes) < 2:
        raise UserError(f"{class_root} has only one class sub-folder ('{classes[0]}'); need at least 2 classes")
    size = cfg.folder_image_size
    skipped: list[str] = []
    splits = {split: _read_folder(folder, classes, size, root, skipped) for split, folder in layout.items()}
    if "train" not in layout:
        whole = _read_folder(root, classes, size, root, skipped)
        n_val, n_test = _share(len(whole), cfg.val_split), _share(len(whole), cfg.test_split)  # both of the whole
        rest, splits["test"] = _carve(whole, n_test, (cfg.seed, _SEED_TEST), classes, "test")
        splits["train"], splits["val"] = _carve(rest, n_val, (cfg.seed, _SEED_VAL), classes, "val")
        sources = {"val": "carved from the folder", "test": "carved from the folder"}
    else:
        sources = {split: f"{layout[split].name}/" for split in ("val", "test") if split in layout}
        if "test" not in splits:
            n_test = _share(len(splits["train"]), cfg.test_split)
            splits["train"], splits["test"] = _carve(splits["train"], n_test, (cfg.seed, _SEED_TEST), classes, "test")
            sources["test"] = "carved from train/"
        if "val" not in splits:
            n_val = _share(len(splits["train"]), cfg.val_split)
            splits["train"], splits["val"] = _carve(splits["train"], n_val, (cfg.seed, _SEED_VAL), classes, "val")
            sources["val"] = "carved from train/"
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (", ..." if len(skipped) > SKIPPED_SHOWN else "")
        log.warning("skipped %d unreadable image file(s) in %s: %s", len(skipped), root, shown)
    info = {"source": str(root), "skipped": {"count": len(skipped), "files": skipped[:SKIPPED_SHOWN]}}
    return _finish(f"{FOLDER_PREFIX}{root}", classes, splits, (size, size, 3), cfg, info, sources)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _fetch(spec: DatasetSpec, cfg: DataConfig) -> tuple[RawData, str]:
    """The raw arrays and where they came from: built-in, --data-dir, or the Keras download cache."""
    if spec.read_dir is None:
        return spec.load(cfg), "built-in"
    if cfg.data_dir is not None:
        data_dir = Path(cfg.data_dir).expanduser()
        if not data_dir.exists():
            raise UserError(f"data dir {data_dir} does not exist")
        try:
            found = spec.read_dir(data_dir)
        except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(
                f"cannot read {spec.name} from {data_dir}: {type(e).__name__}: {e}".replace("\n", " ")
            ) from e
        if found is None:
            raise UserError(f"no {spec.name} copy in {data_dir}: expected {' or '.join(spec.data_files)}")
        raw, path = found
        return raw, str(path.resolve())
    # Keras's get_file raises a plain Exception ("URL fetch failure on ...") when offline, so nothing narrower works.
    try:
        return spec.load(cfg), spec.origin
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"cannot download {spec.name} from {spec.origin} (offline? {reason}); pass --data-dir DIR with a "
            f"pre-downloaded {' or '.join(spec.data_files)}, or use --dataset synthetic"
        ) from e


def _as_split(x: np.ndarray, y: np.ndarray, spec: DatasetSpec, where: str) -> Split:
    """Keras-style arrays -> a Split (greyscale to RGB, labels flattened), checked against the registry row."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if x.shape[1:] != spec.native_shape or len(x) != len(y) or x.dtype != np.uint8:
        raise UserError(
            f"{spec.name} data from {where} has images {x.shape} {x.dtype} and {len(y)} labels; "
            f"expected uint8 images (N, {', '.join(map(str, spec.native_shape))})"
        )
    if len(y) and not 0 <= y.min() <= y.max() < len(spec.classes):
        raise UserError(f"{spec.name} data from {where} has labels outside 0..{len(spec.classes) - 1}")
    return Split(np.ascontiguousarray(x), y)


def _finish(
    name: str,
    classes: Sequence[str],
    splits: dict[str, Split],
    shape: tuple[int, int, int],
    cfg: DataConfig,
    info: dict,
    sources: dict[str, str],
) -> Dataset:
    """Apply limit_train and record counts and split provenance in info."""
    train = splits["train"]
    if cfg.limit_train is not None and cfg.limit_train < len(train):
        n_classes = len(np.unique(train.y))
        if cfg.limit_train < n_classes:
            raise UserError(f"limit_train={cfg.limit_train} is smaller than the number of classes ({n_classes})")
        picked, _ = stratified_pick(train.y, cfg.limit_train, (cfg.seed, _SEED_LIMIT), leave_one=False)
        train = _take(train, picked)
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


def load_run_dataset(manifest: dict, run_dir: Path, way_out: str = "retrain") -> Dataset:
    """A complete run's dataset rebuilt from its stored config; refuses data that differs from what it was trained on
    (dataset fingerprint). ``way_out`` ends the error message (e.g. "pass --no-verify")."""
    data_cfg = DataConfig(**manifest["config"]["data"])
    dataset = load_dataset(data_cfg)
    if dataset.fingerprint() != manifest["dataset"]["fingerprint"]:
        raise UserError(f"the data of '{data_cfg.dataset}' differs from what run '{Path(run_dir).name}' was trained "
                        f"on (dataset fingerprint changed); restore the original data or {way_out}")
    return dataset


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset ``cfg`` names, with a seeded stratified validation split carved from training data.

    The official test set stays the test set; folders without a test/ sub-folder get a carved one.
    Raises UserError for unknown names, missing or unreadable data, and splits too small to hold every class.
    """
    if cfg.dataset.startswith(FOLDER_PREFIX):
        return _load_folder(cfg)
    spec = get_dataset_spec(cfg.dataset)
    ((x_train, y_train), (x_test, y_test)), source = _fetch(spec, cfg)
    train = _as_split(x_train, y_train, spec, source)
    test = _as_split(x_test, y_test, spec, source)
    train, val = _carve(train, _share(len(train), cfg.val_split), (cfg.seed, _SEED_VAL), spec.classes, "val")
    info = {"source": source, "skipped": {"count": 0, "files": []}}
    sources = {"val": "carved from train", "test": "official test set"}
    return _finish(
        spec.name, spec.classes, {"train": train, "val": val, "test": test}, spec.native_shape, cfg, info, sources
    )


# ----------------------------------------------------------------------------------------------
# Augmentation and tf.data pipelines
# ----------------------------------------------------------------------------------------------

# One row per op, in the order they are applied: (option, layer factory taking the value and a seed).
_AUG_LAYERS: tuple[tuple[str, Callable[[float, int], keras.layers.Layer]], ...] = (
    ("flip", lambda value, seed: keras.layers.RandomFlip("horizontal", seed=seed)),
    ("rotation", lambda value, seed: keras.layers.RandomRotation(value, seed=seed)),
    ("zoom", lambda value, seed: keras.layers.RandomZoom(value, seed=seed)),
    ("shift", lambda value, seed: keras.layers.RandomTranslation(value, value, seed=seed)),
    ("contrast", lambda value, seed: keras.layers.RandomContrast(value, seed=seed)),
    ("brightness", lambda value, seed: keras.layers.RandomBrightness(value, value_range=(0, 255), seed=seed)),
)


class _ClipPixels(keras.layers.Layer):
    """Clips pixel values into [0, 255] after augmentation."""

    def call(self, inputs):
        """Return ``inputs`` clipped to [0, 255]."""
        return keras.ops.clip(inputs, 0.0, 255.0)


def build_augmenter(aug: AugmentConfig, seed: int = 0) -> keras.Sequential | None:
    """Keras preprocessing layers for float 0..255 NHWC batches, clipped to [0, 255]; None when no op is on."""
    ops = aug.resolved()
    layers = [make(ops[name], seed + i) for i, (name, make) in enumerate(_AUG_LAYERS) if ops[name]]
    if not layers:
        return None
    return keras.Sequential([*layers, _ClipPixels()], name="augment")


def make_pipeline(
    split: Split,
    *,
    batch_size: int,
    training: bool,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline of (float32 0..255 NHWC images, int64 labels) batches; the last batch is kept.

    Training: cache, seeded shuffle reshuffled every epoch, batch, augment, prefetch. Evaluation: cache, batch,
    prefetch, in order and unaugmented. ``shuffle`` overrides the default (on for training only).
    """
    if batch_size <= 0:
        raise UserError(f"batch_size={batch_size} must be > 0")
    augmenter = build_augmenter(augment, seed) if training and augment is not None else None
    shuffled = training if shuffle is None else shuffle
    ds = tf.data.Dataset.from_tensor_slices((split.x, split.y.astype(np.int64))).cache()
    if shuffled:
        ds = ds.shuffle(max(len(split), 1), seed=seed, reshuffle_each_iteration=True)

    def to_float(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(x, tf.float32)  # after batching: the cache and shuffle buffer hold uint8
        return (x if augmenter is None else augmenter(x, training=True)), y

    return ds.batch(batch_size).map(to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
