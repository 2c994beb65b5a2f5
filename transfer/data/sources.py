"""The dataset source registry: every dataset a run can name is one row of :data:`SOURCES`.

A source is any object with ``name`` (how it is listed), ``matches(dataset)`` (does this dataset name belong to
it), ``load(cfg) -> Dataset`` (the three splits, seeded and stratified) and ``describe()``. Adding a dataset source
is adding one row. Keras is imported only when a Keras dataset is downloaded or a CIFAR copy parsed; nothing here
imports TensorFlow at import time.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from transfer.config import DataConfig
from transfer.data.copies import FASHION_FILES, RawData, read_cifar, read_fashion_mnist, read_mnist
from transfer.data.folders import FOLDER_PREFIX, load_folder
from transfer.data.splits import (
    SEED_SYNTH_TEST,
    SEED_SYNTH_TRAIN,
    SEED_TEST,
    SEED_VAL,
    Dataset,
    Split,
    assemble,
    carve,
    share,
)
from transfer.data.synthetic import SYNTHETIC_CLASSES, synthetic_images
from transfer.errors import UserError, unknown


class DatasetSource(Protocol):
    """What every registry row provides."""

    name: str

    def matches(self, dataset: str) -> bool:
        """Whether the dataset name ``dataset`` (as the user gave it) is this source's."""

    def load(self, cfg: DataConfig) -> Dataset:
        """The dataset ``cfg.dataset`` names, split as ``cfg`` says; UserError for missing or unreadable data."""

    def describe(self) -> str:
        """One line for listings."""


# ----------------------------------------------------------------------------------------------
# Fixed datasets: an official train/test pair, validation carved from train
# ----------------------------------------------------------------------------------------------


def _as_split(x: np.ndarray, y: np.ndarray, source, where: str) -> Split:
    """Keras-style arrays -> a Split (greyscale to RGB, labels flattened), checked against the registry row."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if x.shape[1:] != source.native_shape or len(x) != len(y) or x.dtype != np.uint8:
        raise UserError(
            f"{source.name} data from {where} has images {x.shape} {x.dtype} and {len(y)} labels; "
            f"expected uint8 images (N, {', '.join(map(str, source.native_shape))})"
        )
    if len(y) and not 0 <= y.min() <= y.max() < len(source.classes):
        raise UserError(f"{source.name} data from {where} has labels outside 0..{len(source.classes) - 1}")
    return Split(np.ascontiguousarray(x), y)


def _official_splits(source: KerasDataset | SyntheticSource, raw: RawData, where: str, cfg: DataConfig) -> Dataset:
    """A fixed train/test pair as a Dataset: the test set stays the test set, validation is carved from train."""
    (x_train, y_train), (x_test, y_test) = raw
    train = _as_split(x_train, y_train, source, where)
    test = _as_split(x_test, y_test, source, where)
    train, val = carve(train, share(len(train), cfg.val_split), (cfg.seed, SEED_VAL), source.classes, "val")
    info = {"source": where, "skipped": {"count": 0, "files": []}}
    sources = {"val": "carved from train", "test": "official test set"}
    return assemble(source.name, source.classes, {"train": train, "val": val, "test": test}, source.native_shape,
                    cfg, info, sources)


@dataclass(frozen=True)
class KerasDataset:
    """A Keras built-in dataset: read from a pre-downloaded copy in ``--data-dir``, else downloaded (and cached)
    by its Keras loader."""

    name: str
    classes: tuple[str, ...]
    native_shape: tuple[int, int, int]
    download: Callable[[], RawData]  # the Keras loader: downloads into ~/.keras/datasets, or reads its cache
    origin: str  # the URL the Keras loader downloads from
    read_dir: Callable[[Path], tuple[RawData, Path] | None]  # a pre-downloaded copy's reader; None if absent
    data_files: tuple[str, ...]  # what read_dir looks for in --data-dir, for messages
    cache_entries: tuple[str, ...] = ()  # what the Keras loader leaves in ~/.keras/datasets

    def matches(self, dataset: str) -> bool:
        return dataset.strip().lower() == self.name

    def cached(self) -> bool:
        """Whether the Keras loader's download cache already holds this dataset (``transfer doctor``)."""
        from transfer.backbones import keras_home

        return any((keras_home() / "datasets" / entry).exists() for entry in self.cache_entries)

    def describe(self) -> str:
        height, width, _ = self.native_shape
        return (f"Keras dataset, {len(self.classes)} classes, {height}x{width}; offline: --data-dir DIR with "
                f"{' or '.join(self.data_files)}")

    def load(self, cfg: DataConfig) -> Dataset:
        return _official_splits(self, *self._fetch(cfg), cfg)

    def _fetch(self, cfg: DataConfig) -> tuple[RawData, str]:
        """The raw arrays and where they came from: --data-dir, or the Keras download cache."""
        if cfg.data_dir is not None:
            data_dir = Path(cfg.data_dir).expanduser()
            if not data_dir.exists():
                raise UserError(f"data dir {data_dir} does not exist")
            try:
                found = self.read_dir(data_dir)
            except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                    zlib.error) as e:
                raise UserError(
                    f"cannot read {self.name} from {data_dir}: {type(e).__name__}: {e}".replace("\n", " ")
                ) from e
            if found is None:
                raise UserError(f"no {self.name} copy in {data_dir}: expected {' or '.join(self.data_files)}")
            raw, path = found
            return raw, str(path.resolve())
        # Keras's get_file raises a plain Exception ("URL fetch failure on ...") when offline, so nothing narrower
        # works.
        try:
            return self.download(), self.origin
        except Exception as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(
                f"cannot download {self.name} from {self.origin} (offline? {reason}); pass --data-dir DIR with a "
                f"pre-downloaded {' or '.join(self.data_files)}, or use --dataset synthetic"
            ) from e


def _keras_loader(module: str, **kwargs) -> Callable[[], RawData]:
    """``keras.datasets.<module>.load_data(**kwargs)``, importing Keras only when called."""

    def load() -> RawData:
        import keras

        return getattr(keras.datasets, module).load_data(**kwargs)

    return load


@dataclass(frozen=True)
class SyntheticSource:
    """Coloured shapes generated from the seed: no files, no network (tests, smoke runs, offline demos)."""

    name: str = "synthetic"
    classes: tuple[str, ...] = SYNTHETIC_CLASSES
    native_shape: tuple[int, int, int] = (32, 32, 3)

    def matches(self, dataset: str) -> bool:
        return dataset.strip().lower() == self.name

    def describe(self) -> str:
        return f"generated shapes, {len(self.classes)} classes, 32x32; --synthetic-train/--synthetic-test images"

    def load(self, cfg: DataConfig) -> Dataset:
        raw = (synthetic_images(cfg.synthetic_train, seed=(cfg.seed, SEED_SYNTH_TRAIN)),
               synthetic_images(cfg.synthetic_test, seed=(cfg.seed, SEED_SYNTH_TEST)))
        return _official_splits(self, raw, "built-in", cfg)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten digits that ship inside scikit-learn: 1,797 real 8x8 greyscale scans, 16 grey levels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise UserError('--dataset digits needs scikit-learn, which ships the images: pip install -e ".[data]" '
                        "(or scikit-learn)") from exc
    digits = load_digits()
    x = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1), digits.target.astype(np.int64)


def _skimage_faces() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's ``lfw_subset``: 200 real 25x25 greyscale photo crops, the first 100 faces (Labeled Faces in
    the Wild), the last 100 not faces (crops of the same photos' backgrounds)."""
    try:
        from skimage.data import lfw_subset
    except ImportError as exc:
        raise UserError('--dataset faces needs scikit-image, which ships the images: pip install -e ".[data]" '
                        "(or scikit-image)") from exc
    images = np.asarray(lfw_subset(), dtype=np.float64)
    scale = 255.0 if images.max() <= 1.0 else 1.0  # float in [0, 1] on scikit-image 0.26, uint8 before
    x = np.clip(np.round(images * scale), 0, 255).astype(np.uint8)
    y = np.repeat(np.array([0, 1], dtype=np.int64), [100, len(x) - 100])
    return np.repeat(x[..., None], 3, axis=-1), y


@dataclass(frozen=True)
class BundledDataset:
    """Real images that ship inside an installed package (no download, no --data-dir): one labelled set, from which
    test and validation splits are carved, seeded and stratified, as from a folder without test/."""

    name: str
    classes: tuple[str, ...]
    native_shape: tuple[int, int, int]
    arrays: Callable[[], tuple[np.ndarray, np.ndarray]]  # (uint8 NHWC RGB images, int labels)
    origin: str  # what the images are and which package carries them

    def matches(self, dataset: str) -> bool:
        return dataset.strip().lower() == self.name

    def describe(self) -> str:
        height, width, _ = self.native_shape
        return f"{self.origin}; {len(self.classes)} classes, {height}x{width}, no download"

    def load(self, cfg: DataConfig) -> Dataset:
        x, y = self.arrays()
        whole = _as_split(x, y, self, self.origin)
        n_val, n_test = share(len(whole), cfg.val_split), share(len(whole), cfg.test_split)  # both of the whole
        rest, test = carve(whole, n_test, (cfg.seed, SEED_TEST), self.classes, "test")
        train, val = carve(rest, n_val, (cfg.seed, SEED_VAL), self.classes, "val")
        info = {"source": self.origin, "skipped": {"count": 0, "files": []}}
        sources = {"val": "carved from the set", "test": "carved from the set"}
        return assemble(self.name, self.classes, {"train": train, "val": val, "test": test}, self.native_shape,
                        cfg, info, sources)


@dataclass(frozen=True)
class FolderSource:
    """``folder:PATH``: a folder of class sub-folders (see :mod:`transfer.data.folders`)."""

    prefix: str = FOLDER_PREFIX

    @property
    def name(self) -> str:
        return f"{self.prefix}PATH"

    def matches(self, dataset: str) -> bool:
        return dataset.startswith(self.prefix)

    def describe(self) -> str:
        return "one sub-folder of images per class, optionally split into train/ (val/, test/)"

    def load(self, cfg: DataConfig) -> Dataset:
        return load_folder(cfg.dataset[len(self.prefix):], cfg)


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

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
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"

SOURCES: tuple[DatasetSource, ...] = (
    KerasDataset(
        name="cifar10",
        classes=CIFAR10_CLASSES,
        native_shape=(32, 32, 3),
        download=_keras_loader("cifar10"),
        origin="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        read_dir=partial(
            read_cifar,
            archive="cifar-10-python.tar.gz",
            folder="cifar-10-batches-py",
            train=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test="test_batch",
            label_key="labels",
        ),
        data_files=("cifar-10-python.tar.gz", "cifar-10-batches-py/"),
        cache_entries=("cifar-10-batches-py", "cifar-10-batches-py-target"),
    ),
    KerasDataset(
        name="cifar100",
        classes=CIFAR100_CLASSES,
        native_shape=(32, 32, 3),
        download=_keras_loader("cifar100", label_mode="fine"),
        origin="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        read_dir=partial(
            read_cifar,
            archive="cifar-100-python.tar.gz",
            folder="cifar-100-python",
            train=("train",),
            test="test",
            label_key="fine_labels",
        ),
        data_files=("cifar-100-python.tar.gz", "cifar-100-python/"),
        cache_entries=("cifar-100-python", "cifar-100-python-target"),
    ),
    KerasDataset(
        name="mnist",
        classes=MNIST_CLASSES,
        native_shape=(28, 28, 3),
        download=_keras_loader("mnist"),
        origin=f"{_KERAS_ORIGIN}mnist.npz",
        read_dir=read_mnist,
        data_files=("mnist.npz",),
        cache_entries=("mnist.npz",),
    ),
    KerasDataset(
        name="fashion_mnist",
        classes=FASHION_MNIST_CLASSES,
        native_shape=(28, 28, 3),
        download=_keras_loader("fashion_mnist"),
        origin=f"{_KERAS_ORIGIN}train-labels-idx1-ubyte.gz",  # the first of the four files Keras fetches
        read_dir=read_fashion_mnist,
        data_files=(" + ".join(FASHION_FILES),),
        cache_entries=("fashion-mnist",),
    ),
    BundledDataset(
        name="digits",
        classes=tuple(str(digit) for digit in range(10)),
        native_shape=(8, 8, 3),
        arrays=_sklearn_digits,
        origin="UCI handwritten digits bundled with scikit-learn",
    ),
    BundledDataset(
        name="faces",
        classes=("face", "not_face"),
        native_shape=(25, 25, 3),
        arrays=_skimage_faces,
        origin="real photo crops bundled with scikit-image (lfw_subset: 100 faces, 100 backgrounds)",
    ),
    SyntheticSource(),
    FolderSource(),
)


def dataset_names() -> list[str]:
    """How every source is named: the fixed datasets, plus ``folder:PATH``."""
    return [source.name for source in SOURCES]


def get_source(dataset: str) -> DatasetSource:
    """The registry row that ``dataset`` names; an unknown name raises UserError with the closest match."""
    for source in SOURCES:
        if source.matches(dataset):
            return source
    raise unknown("dataset", dataset, dataset_names())


def load_dataset(cfg: DataConfig, image_size: int | None = None) -> Dataset:
    """Load the dataset ``cfg`` names, with seeded, stratified splits, as a model of input size ``image_size`` reads
    it (:meth:`Dataset.for_model`: fixed datasets keep their native size, folders are decoded at that size).

    A fixed dataset keeps its official test set and gets a validation split carved from training data; folders
    without val/ or test/ sub-folders get carved ones. Raises UserError for unknown names, missing or unreadable
    data, and splits too small to hold every class.
    """
    return get_source(cfg.dataset).load(cfg).for_model(image_size)


def load_run_dataset(manifest: dict, run_dir: Path, way_out: str = "retrain") -> Dataset:
    """A complete run's dataset rebuilt from its stored config; refuses data that differs from what it was trained on
    (dataset fingerprint). ``way_out`` ends the error message (e.g. "pass --no-verify")."""
    stored = dict(manifest["config"]["data"])
    stored.update({"cache": "none"} if "cache" in stored else {})  # read once to evaluate or export: no cache
    data_cfg = DataConfig(**stored)
    trained_size = manifest.get("input", {}).get("shape", [None])[0]
    dataset = load_dataset(data_cfg, image_size=trained_size)  # a folder is decoded at the size the run trained at
    if dataset.fingerprint() != manifest["dataset"]["fingerprint"]:
        raise UserError(f"the data of '{data_cfg.dataset}' differs from what run '{Path(run_dir).name}' was trained "
                        f"on (dataset fingerprint changed); restore the original data or {way_out}")
    return dataset
