"""Pre-downloaded copies of the Keras datasets (``--data-dir``), read exactly as the Keras loaders read them.

Each reader takes the directory (or file) the user gave and returns ``((x_train, y_train), (x_test, y_test))`` and
the path it read, or None when no copy is there. Keras is imported only when a CIFAR copy is parsed.
"""

from __future__ import annotations

import gzip
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transfer.errors import UserError

# (x_train, y_train), (x_test, y_test), as the Keras loaders return them.
RawData = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


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
    from keras.src.datasets.cifar import load_batch

    def read(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [load_batch(str(batches / name), label_key=label_key) for name in names]
        x = np.concatenate([data for data, _ in parts]).transpose(0, 2, 3, 1)
        return x, np.concatenate([np.asarray(labels) for _, labels in parts])

    return read(train), read([test])


def read_cifar(
    data_dir: Path, *, archive: str, folder: str, train: tuple[str, ...], test: str, label_key: str
) -> tuple[RawData, Path] | None:
    """A pre-downloaded CIFAR copy: the extracted batches folder or the .tar.gz (extracted to a temporary dir)."""
    batches = None if data_dir.is_file() else _find_dir(data_dir, folder, train[0])
    if batches is not None:
        return _parse_cifar(batches, train, test, label_key), batches
    tar = _find_file(data_dir, archive)
    if tar is None:
        return None
    from keras.src.utils.file_utils import extract_archive

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


def read_mnist(data_dir: Path) -> tuple[RawData, Path] | None:
    """A pre-downloaded mnist.npz, read as the Keras loader reads it."""
    path = _find_file(data_dir, "mnist.npz")
    if path is None:
        return None
    with np.load(path, allow_pickle=False) as f:
        return ((f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])), path


FASHION_FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)


def read_fashion_mnist(data_dir: Path) -> tuple[RawData, Path] | None:
    """The four pre-downloaded Fashion-MNIST idx files, read as the Keras loader reads them."""
    paths = [_find_file(data_dir, name, subdirs=("fashion-mnist", "datasets/fashion-mnist")) for name in FASHION_FILES]
    if any(path is None for path in paths):
        return None

    def read(labels_path: Path, images_path: Path) -> tuple[np.ndarray, np.ndarray]:
        with gzip.open(labels_path, "rb") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)
        with gzip.open(images_path, "rb") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(len(y), 28, 28)
        return x, y

    return (read(paths[0], paths[1]), read(paths[2], paths[3])), paths[0].parent
