"""Shared fixtures: tiny datasets made on the fly in the real on-disk formats (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gzip
import io
import pickle
import struct
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.config import DataConfig
from transfer.data import Dataset, load_dataset


@dataclass
class FakeKerasData:
    """A fake copy of a Keras dataset on disk and the arrays it holds (HWC, or HW for greyscale)."""

    archive_dir: Path  # holds only the downloaded file (.tar.gz / .npz / .gz files)
    extracted_dir: Path | None  # holds the extracted folder (CIFAR only)
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.permutation(np.arange(n) % 10)


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the official CIFAR files (pickled by Python 2) contain them.

    Python 3 pickles bytes at protocol 2 through ``_codecs.encode``, which Keras's restricted unpickler rightly refuses.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _python2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _cifar_batch(path: Path, x: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    """One CIFAR batch as the official files store it: a Python 2 pickle with CHW-planar rows of 3072 bytes."""
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
    batch = {b"batch_label": path.name.encode(), label_key.encode(): [int(v) for v in labels], b"data": rows}
    batch[b"filenames"] = [f"img_{i}.png".encode() for i in range(len(x))]
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
    path.write_bytes(_python2_pickle(batch))


def _tar_folder(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> FakeKerasData:
    """cifar-10-python.tar.gz (in archive_dir) and cifar-10-batches-py/ (in extracted_dir): 5 x 4 train, 6 test."""
    rng = np.random.default_rng(10)
    x_train, y_train = _images(rng, 20, (32, 32, 3))
    x_test, y_test = _images(rng, 6, (32, 32, 3))
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        _cifar_batch(folder / f"data_batch_{i + 1}", x_train[i * 4 : i * 4 + 4], y_train[i * 4 : i * 4 + 4], "labels")
    _cifar_batch(folder / "test_batch", x_test, y_test, "labels")
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": 4, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_python2_pickle(meta))
    (tmp_path / "archive").mkdir()
    _tar_folder(folder, tmp_path / "archive" / "cifar-10-python.tar.gz")
    return FakeKerasData(tmp_path / "archive", tmp_path / "extracted", x_train, y_train, x_test, y_test)


@pytest.fixture
def fake_cifar100(tmp_path: Path) -> FakeKerasData:
    """cifar-100-python.tar.gz and cifar-100-python/ with train, test and meta files."""
    rng = np.random.default_rng(100)
    x_train, y_train = _images(rng, 20, (32, 32, 3))
    x_test, y_test = _images(rng, 5, (32, 32, 3))
    y_train, y_test = y_train * 7 + 3, y_test * 7 + 3  # spread over the 100 fine labels
    folder = tmp_path / "extracted" / "cifar-100-python"
    folder.mkdir(parents=True)
    _cifar_batch(folder / "train", x_train, y_train, "fine_labels")
    _cifar_batch(folder / "test", x_test, y_test, "fine_labels")
    (folder / "meta").write_bytes(_python2_pickle({b"fine_label_names": [b"apple"]}))
    (tmp_path / "archive").mkdir()
    _tar_folder(folder, tmp_path / "archive" / "cifar-100-python.tar.gz")
    return FakeKerasData(tmp_path / "archive", tmp_path / "extracted", x_train, y_train, x_test, y_test)


@pytest.fixture
def fake_mnist(tmp_path: Path) -> FakeKerasData:
    """mnist.npz with keys x_train, y_train, x_test, y_test (greyscale 28x28)."""
    rng = np.random.default_rng(28)
    x_train, y_train = _images(rng, 30, (28, 28))
    x_test, y_test = _images(rng, 10, (28, 28))
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return FakeKerasData(tmp_path, None, x_train, y_train, x_test, y_test)


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> FakeKerasData:
    """The four gzipped idx files of Fashion-MNIST (big-endian headers, then raw uint8)."""
    rng = np.random.default_rng(29)
    x_train, y_train = _images(rng, 30, (28, 28))
    x_test, y_test = _images(rng, 10, (28, 28))
    for prefix, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        labels = struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes()
        images = struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes()
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    return FakeKerasData(tmp_path, None, x_train, y_train, x_test, y_test)


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def write_class_images(folder: Path, hue: tuple[int, int, int], n: int, seed: int) -> None:
    """``n`` readable images of one class in several formats and modes (PNG, JPEG, greyscale, RGBA, BMP, GIF)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(np.array(hue) + rng.integers(-20, 21, (24, 20, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        kind = i % 6
        if kind == 0:
            _save(image, folder / f"img{i}.png")
        elif kind == 1:
            _save(image, folder / f"img{i}.JPG", quality=90)
        elif kind == 2:
            _save(image.convert("L"), folder / f"img{i}.png")
        elif kind == 3:
            _save(image.convert("RGBA"), folder / f"img{i}.png")
        elif kind == 4:
            _save(image, folder / "nested" / f"img{i}.bmp")
        else:
            _save(image.convert("P"), folder / f"img{i}.gif")


@pytest.fixture
def class_images():
    """The class-folder writer: ``class_images(folder, (r, g, b), n, seed)`` writes n images in mixed formats."""
    return write_class_images


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder of three classes (cat, dog, fox) x 8 images, plus a corrupt JPEG, a truncated PNG and a text file."""
    root = tmp_path / "pets"
    for k, (name, hue) in enumerate({"cat": (200, 60, 60), "dog": (60, 200, 60), "fox": (60, 60, 200)}.items()):
        write_class_images(root / name, hue, 8, seed=k)
    (root / "cat" / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    (root / "dog" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "fox" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def tiny_synthetic() -> Dataset:
    """A small synthetic dataset (160 train, 40 val, 100 test), shared by the session: do not modify it."""
    return load_dataset(DataConfig(dataset="synthetic", synthetic_train=200, synthetic_test=100, val_split=0.2))


_PLAIN_KERAS = """
import sys
import keras
import numpy as np
model = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
project = sorted(m for m in sys.modules if m.split(".")[0] in ("transfer", "export", "serve"))
assert not project, f"the project was imported: {project}"
"""


def predict_with_plain_keras(model_path: Path, x: np.ndarray, work: Path) -> np.ndarray:
    """Predictions of ``model_path`` loaded by ``keras.saving.load_model`` in a fresh Python that imports only Keras
    and NumPy (never this project), run from an empty directory."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "x.npy", x)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", _PLAIN_KERAS, str(Path(model_path).resolve()), "x.npy", "p.npy"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(work / "p.npy")


@pytest.fixture
def plain_keras_predict():
    """``plain_keras_predict(model_path, x, work_dir)``: see :func:`predict_with_plain_keras`."""
    return predict_with_plain_keras
