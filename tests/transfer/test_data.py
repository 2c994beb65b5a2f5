"""transfer.data: the source registry, loaders (on fake files in the real formats), folders, splits and pipelines."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from transfer.config import AugmentConfig, DataConfig
from transfer.data import (
    CIFAR100_CLASSES,
    SOURCES,
    Split,
    build_augmenter,
    dataset_names,
    get_source,
    load_dataset,
    make_pipeline,
    synthetic_images,
)
from transfer.data.folders import FileSplit, resolve_cache
from transfer.data.sources import BundledDataset, FolderSource, KerasDataset, SyntheticSource
from transfer.data.splits import ANY_INPUT_SIZE
from transfer.errors import UserError
from transfer.images import decode_image


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root with its size and content hash, to prove a loader left a directory alone."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _epoch(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in ds), strict=True)
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------- registry and config


def test_registry_names_and_unknown_dataset_suggests_closest():
    assert {"cifar10", "cifar100", "mnist", "fashion_mnist", "synthetic", "folder:PATH"} <= set(dataset_names())
    with pytest.raises(UserError, match=r"unknown dataset 'cifar1'; did you mean 'cifar10'\?"):
        load_dataset(DataConfig(dataset="cifar1"))


def test_every_source_is_one_row_of_one_registry():
    kinds = {type(source) for source in SOURCES}
    assert kinds == {KerasDataset, BundledDataset, SyntheticSource, FolderSource}
    assert isinstance(get_source("folder:/any/where"), FolderSource)
    assert isinstance(get_source("synthetic"), SyntheticSource) and get_source(" CIFAR10 ").name == "cifar10"
    for source in SOURCES:  # the registry answers every question through the row itself
        assert source.matches(source.name.replace("PATH", "/x")) and source.describe()
        assert sum(other.matches(source.name.replace("PATH", "/x")) for other in SOURCES) == 1


def test_registry_rows_describe_the_datasets():
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert CIFAR100_CLASSES[:3] == ("apple", "aquarium_fish", "baby") and CIFAR100_CLASSES[-1] == "worm"
    assert get_source("cifar10").classes[0] == "airplane"
    assert get_source("mnist").classes == tuple("0123456789")
    assert get_source("fashion_mnist").classes[-1] == "Ankle boot"
    assert get_source("fashion_mnist").native_shape == (28, 28, 3)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"val_split": 0.95}, "val_split=0.95"),
        ({"test_split": -0.1}, "test_split=-0.1"),
        ({"val_split": 0.5, "test_split": 0.5}, "val_split \\+ test_split"),
        ({"synthetic_train": 0}, "--synthetic-train 0"),
        ({"synthetic_test": -5}, "--synthetic-test -5"),
        ({"limit_train": 0}, "--limit-train 0"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_invalid_data_config_names_the_bad_value(kwargs, bad):
    with pytest.raises(UserError, match=bad):
        DataConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_well_formed():
    cfg = DataConfig(synthetic_train=300, synthetic_test=100, val_split=0.1, seed=3)
    a, b = load_dataset(cfg), load_dataset(cfg)
    other = load_dataset(DataConfig(synthetic_train=300, synthetic_test=100, val_split=0.1, seed=4))
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(sa.x, sb.x)
        np.testing.assert_array_equal(sa.y, sb.y)
        assert sa.x.dtype == np.uint8 and sa.x.shape[1:] == (32, 32, 3)
        assert sa.y.dtype == np.int64 and sa.y.min() >= 0 and sa.y.max() <= 9
        assert np.bincount(sa.y, minlength=10).min() > 0
    assert not np.array_equal(a.train.x, other.train.x)
    assert (len(a.train), len(a.val), len(a.test)) == (270, 30, 100)
    assert [set(np.bincount(split.y)) for split in (a.train, a.val, a.test)] == [{27}, {3}, {10}]
    assert a.classes[:2] == ["circle", "square"] and a.native_shape == (32, 32, 3) and a.name == "synthetic"
    # Train and test come from different seeds: no test image is a copy of a training image.
    train_rows = {row.tobytes() for row in a.train.x}
    assert not any(row.tobytes() in train_rows for row in a.test.x)


def test_synthetic_generator_covers_sizes_that_are_not_multiples_of_the_class_count():
    x, y = synthetic_images(23, seed=0)
    assert x.shape == (23, 32, 32, 3) and np.bincount(y, minlength=10).max() - np.bincount(y).min() <= 1


def test_synthetic_is_learnable_by_a_tiny_cnn():
    keras.utils.set_random_seed(0)
    data = load_dataset(DataConfig(synthetic_train=1000, synthetic_test=500, val_split=0.0))
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    test = make_pipeline(data.test, batch_size=250, training=False)
    _, untrained = model.evaluate(test, verbose=0)
    history = model.fit(make_pipeline(data.train, batch_size=16, training=True, seed=0), epochs=2, verbose=0,
                        shuffle=False)
    _, accuracy = model.evaluate(test, verbose=0)
    assert untrained < 0.25 and history.history["loss"][-1] < history.history["loss"][0]
    assert accuracy > 0.5  # chance is 0.1; 13 seeds measured 0.78..0.94 (train and test come from different seeds)


# ---------------------------------------------------------------------------------------------- Keras datasets


@pytest.mark.parametrize("layout", ["archive", "extracted", "batches_dir_itself"])
def test_cifar10_from_data_dir_round_trips_pixels_and_leaves_the_dir_alone(fake_cifar10, layout):
    data_dir = {
        "archive": fake_cifar10.archive_dir,
        "extracted": fake_cifar10.extracted_dir,
        "batches_dir_itself": fake_cifar10.extracted_dir / "cifar-10-batches-py",
    }[layout]
    before = _snapshot(data_dir)
    data = load_dataset(DataConfig(dataset="cifar10", data_dir=str(data_dir), val_split=0.0))
    assert _snapshot(data_dir) == before
    np.testing.assert_array_equal(data.train.x, fake_cifar10.x_train)
    np.testing.assert_array_equal(data.train.y, fake_cifar10.y_train)
    np.testing.assert_array_equal(data.test.x, fake_cifar10.x_test)
    np.testing.assert_array_equal(data.test.y, fake_cifar10.y_test)
    assert data.train.y.dtype == np.int64 and data.classes[0] == "airplane" and data.native_shape == (32, 32, 3)
    assert data.info["source"].startswith(str(data_dir.resolve()))
    assert data.info["split"]["test_source"] == "official test set"


def test_cifar10_val_is_carved_stratified_from_train_and_fingerprint_ignores_the_copy_format(fake_cifar10):
    cfg = {"dataset": "cifar10", "val_split": 0.2}
    from_tar = load_dataset(DataConfig(data_dir=str(fake_cifar10.archive_dir), **cfg))
    from_dir = load_dataset(DataConfig(data_dir=str(fake_cifar10.extracted_dir), **cfg))
    assert (len(from_tar.train), len(from_tar.val), len(from_tar.test)) == (10, 10, 6)
    assert sorted(from_tar.val.y.tolist()) == list(range(10))  # 2 per class in train: one each side
    merged = np.concatenate([from_tar.train.x, from_tar.val.x])
    assert sorted(map(bytes, merged)) == sorted(map(bytes, fake_cifar10.x_train))
    assert from_tar.fingerprint() == from_dir.fingerprint()


def test_cifar100_from_data_dir_uses_fine_labels(fake_cifar100):
    for data_dir in (fake_cifar100.archive_dir, fake_cifar100.extracted_dir):
        data = load_dataset(DataConfig(dataset="cifar100", data_dir=str(data_dir), val_split=0.0))
        np.testing.assert_array_equal(data.train.x, fake_cifar100.x_train)
        np.testing.assert_array_equal(data.train.y, fake_cifar100.y_train)
        np.testing.assert_array_equal(data.test.y, fake_cifar100.y_test)
        assert len(data.classes) == 100


def test_mnist_npz_from_data_dir_becomes_rgb(fake_mnist):
    before = _snapshot(fake_mnist.archive_dir)
    data = load_dataset(DataConfig(dataset="mnist", data_dir=str(fake_mnist.archive_dir), val_split=0.0))
    assert _snapshot(fake_mnist.archive_dir) == before
    assert data.train.x.shape == (30, 28, 28, 3) and data.native_shape == (28, 28, 3)
    for channel in range(3):
        np.testing.assert_array_equal(data.train.x[..., channel], fake_mnist.x_train)
        np.testing.assert_array_equal(data.test.x[..., channel], fake_mnist.x_test)
    np.testing.assert_array_equal(data.train.y, fake_mnist.y_train)
    # The file itself is accepted as data_dir too.
    direct = load_dataset(DataConfig(dataset="mnist", data_dir=str(fake_mnist.archive_dir / "mnist.npz"), val_split=0))
    assert direct.fingerprint() == data.fingerprint()


def test_fashion_mnist_idx_files_from_data_dir(fake_fashion_mnist):
    data = load_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(fake_fashion_mnist.archive_dir), val_split=0))
    np.testing.assert_array_equal(data.train.x[..., 1], fake_fashion_mnist.x_train)
    np.testing.assert_array_equal(data.test.y, fake_fashion_mnist.y_test)
    assert data.classes[0] == "T-shirt/top"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_data_dir_without_the_files_names_the_dir_and_the_files(tmp_path, name):
    (tmp_path / "unrelated.txt").write_text("x")
    with pytest.raises(UserError) as err:
        load_dataset(DataConfig(dataset=name, data_dir=str(tmp_path)))
    message = str(err.value)
    assert str(tmp_path) in message and get_source(name).data_files[0] in message and "\n" not in message


def test_corrupt_or_truncated_archive_in_data_dir_is_a_user_error(tmp_path, fake_cifar10):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "cifar-10-python.tar.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz is not a CIFAR archive"):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "garbage")))
    archive = fake_cifar10.archive_dir / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # an interrupted download
    with pytest.raises(UserError, match=r"cannot .*cifar-10-python\.tar\.gz"):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(fake_cifar10.archive_dir)))


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_offline_download_is_one_line_naming_dataset_url_and_way_out(monkeypatch, tmp_path, name):
    """The real Keras loader and get_file run; only the network call fails, as it does offline."""
    tried: list[str] = []

    def no_network(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path))  # an empty download cache
    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", no_network)
    with pytest.raises(UserError) as err:
        load_dataset(DataConfig(dataset=name))
    spec = get_source(name)
    message = str(err.value)
    assert tried[0] == spec.origin  # the registry's URL is the one Keras really fetches
    assert name in message and spec.origin in message and "--data-dir" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- image folders


def test_folder_loads_all_modes_and_skips_only_the_unreadable(image_folder: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="transfer"):
        data = load_dataset(DataConfig(dataset=f"folder:{image_folder}", folder_image_size=16, val_split=0.2))
    assert data.classes == ["cat", "dog", "fox"] and data.name == f"folder:{image_folder.resolve()}"
    assert data.native_shape == (16, 16, 3)
    assert data.info["skipped"] == {"count": 2, "files": ["cat/corrupt.jpg", "dog/truncated.png"]}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2" in warnings[0].getMessage() and "corrupt.jpg" in warnings[0].getMessage()
    total = sum(data.info["counts"].values())
    assert total == 24 and data.info["counts"] == {"train": 16, "val": 5, "test": 3}
    for split in (data.train, data.val, data.test):
        assert isinstance(split, FileSplit) and split.streamed and split.size == 16
        assert split.x.dtype == np.uint8 and split.x.shape[1:] == (16, 16, 3)  # decoded on first use
        assert set(split.y.tolist()) == {0, 1, 2}  # every class in every split
    # Each class has its own dominant channel, whatever the file's mode was (grey images excepted).
    for label in range(3):
        means = data.train.x[data.train.y == label].reshape(-1, 3).mean(axis=0)
        assert means.argmax() == label


def test_folder_split_is_seeded(image_folder):
    cfg = DataConfig(dataset=f"folder:{image_folder}", folder_image_size=16, seed=5)
    a, b = load_dataset(cfg), load_dataset(cfg)
    c = load_dataset(DataConfig(dataset=f"folder:{image_folder}", folder_image_size=16, seed=6))
    np.testing.assert_array_equal(a.val.x, b.val.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_folder_with_train_and_test_subfolders_carves_only_val(tmp_path, class_images):
    root = tmp_path / "split"
    for name, hue, seed in (("a", (220, 30, 30), 0), ("b", (30, 30, 220), 1)):
        class_images(root / "train" / name, hue, 10, seed=seed)
        class_images(root / "test" / name, hue, 3, seed=seed + 10)
    data = load_dataset(DataConfig(dataset=f"folder:{root}", folder_image_size=8, val_split=0.2))
    assert data.classes == ["a", "b"]
    assert data.info["counts"] == {"train": 16, "val": 4, "test": 6}
    assert data.info["split"]["test_source"] == "test/" and data.info["split"]["val_source"] == "carved from train/"

    class_images(root / "val" / "a", (220, 30, 30), 2, seed=7)
    with_val = load_dataset(DataConfig(dataset=f"folder:{root}", folder_image_size=8))
    assert with_val.info["counts"] == {"train": 20, "val": 2, "test": 6}
    assert with_val.val.y.tolist() == [0, 0]


def test_folder_with_only_train_carves_test_with_test_split(tmp_path, class_images):
    for name, hue in (("a", (220, 30, 30)), ("b", (30, 30, 220))):
        class_images(tmp_path / "train" / name, hue, 10, seed=0)
    data = load_dataset(DataConfig(dataset=f"folder:{tmp_path}", folder_image_size=8, val_split=0.1, test_split=0.3))
    assert data.info["counts"] == {"train": 12, "val": 2, "test": 6}


def test_decoding_applies_exif_first_frame_alpha_and_16_bit(tmp_path):
    left_red = np.zeros((10, 20, 3), np.uint8)
    left_red[:, :10] = (255, 0, 0)
    left_red[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(left_red).save(tmp_path / "rotated.png", exif=exif)
    rotated = decode_image(tmp_path / "rotated.png", 8)
    assert rotated[1, 4].tolist() == [255, 0, 0] and rotated[6, 4].tolist() == [0, 0, 255]  # left side is now on top

    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert decode_image(tmp_path / "anim.gif", 4)[0, 0].tolist() == [255, 0, 0]

    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (decode_image(tmp_path / "clear.png", 4) == 255).all()  # transparent means white

    Image.fromarray(np.full((6, 6), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert (decode_image(tmp_path / "deep.png", 4) == 255).all()

    Image.new("CMYK", (6, 6), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert decode_image(tmp_path / "cmyk.jpg", 4).shape == (4, 4, 3)


def test_folder_errors_name_the_problem(tmp_path, image_folder, class_images):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(DataConfig(dataset=f"folder:{tmp_path / 'missing'}"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        load_dataset(DataConfig(dataset=f"folder:{tmp_path / 'file.txt'}"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        load_dataset(DataConfig(dataset=f"folder:{tmp_path / 'flat'}"))
    class_images(tmp_path / "one" / "solo", (1, 2, 3), 4, seed=0)
    with pytest.raises(UserError, match="at least 2 classes"):
        load_dataset(DataConfig(dataset=f"folder:{tmp_path / 'one'}"))

    (image_folder / "empty").mkdir()
    with pytest.raises(UserError, match="class 'empty' has no readable images"):
        load_dataset(DataConfig(dataset=f"folder:{image_folder}"))
    (image_folder / "empty" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="class 'empty' has no readable images"):
        load_dataset(DataConfig(dataset=f"folder:{image_folder}"))


def test_folder_class_too_small_for_its_splits(tmp_path, class_images):
    class_images(tmp_path / "big", (200, 0, 0), 10, seed=0)
    class_images(tmp_path / "tiny", (0, 0, 200), 1, seed=1)
    with pytest.raises(UserError, match="class 'tiny' has only 1 image"):
        load_dataset(DataConfig(dataset=f"folder:{tmp_path}", folder_image_size=8))
    data = load_dataset(DataConfig(dataset=f"folder:{tmp_path}", folder_image_size=8, val_split=0, test_split=0))
    assert len(data.train) == 11 and len(data.val) == len(data.test) == 0


# ---------------------------------------------------------------------------------------------- streamed folders


def _jpeg_folder(root: Path, per_class: int = 6, side: int = 40) -> Path:
    """Two classes of small JPEGs (red-ish and blue-ish, with grain)."""
    rng = np.random.default_rng(7)
    for name, hue in (("blue", (30, 40, 220)), ("red", (220, 40, 30))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(hue) + rng.integers(-30, 31, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


def _folder(root: Path, size: int | None = None, **kwargs) -> DataConfig:
    return DataConfig(dataset=f"folder:{root}", folder_image_size=size, **kwargs)


def test_folder_splits_hold_files_not_pixels(tmp_path):
    import tracemalloc

    root = _jpeg_folder(tmp_path / "jpegs", per_class=20)
    tracemalloc.start()
    try:
        data = load_dataset(_folder(root), image_size=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pixels = 40 * 256 * 256 * 3  # what decoding the folder at the model's size would hold: 7.9 MB
    assert peak < pixels / 8, f"loading traced {peak:,} bytes"
    for split in (data.train, data.val, data.test):
        assert isinstance(split, FileSplit) and "x" not in vars(split)  # nothing decoded
        arrays = [v for v in vars(split).values() if isinstance(v, np.ndarray)]
        assert all(a.dtype != np.uint8 or a.shape[1:] == (32,) for a in arrays)  # only sha256 digests are bytes
    assert sum(len(s) for s in (data.train, data.val, data.test)) == 40


def test_folder_is_decoded_at_the_model_size_unless_folder_image_size_is_given(tmp_path):
    root = _jpeg_folder(tmp_path / "jpegs")
    at_model = load_dataset(_folder(root), image_size=48)
    assert at_model.native_shape == (48, 48, 3) and at_model.train.size == at_model.test.size == 48
    assert at_model.info["decode"] == {"size": 48, "chosen_by": "the model's input size", "cache": "none"}
    x, _ = _epoch(make_pipeline(at_model.train, batch_size=4, training=True))
    assert x.shape[1:] == (48, 48, 3)

    given = load_dataset(_folder(root, size=24), image_size=48)  # an explicit --folder-image-size wins
    assert given.native_shape == (24, 24, 3) and given.info["decode"]["chosen_by"] == "--folder-image-size"
    any_size = load_dataset(_folder(root))  # a model that takes any size (the scratch baselines)
    assert any_size.native_shape == (ANY_INPUT_SIZE,) * 2 + (3,)
    # Same files, same splits: the fingerprint does not depend on the decode size.
    assert at_model.fingerprint() == given.fingerprint() == any_size.fingerprint()
    # Fixed datasets keep their native size whatever the model takes (it resizes in-graph).
    assert load_dataset(DataConfig(synthetic_train=20, synthetic_test=10), image_size=96).native_shape == (32, 32, 3)


def test_folder_pipeline_decodes_exactly_like_predict_and_serve(tmp_path, image_folder):
    data = load_dataset(_folder(image_folder, val_split=0.2), image_size=20)
    x, y = _epoch(make_pipeline(data.train, batch_size=5, training=False))
    expected = np.stack([decode_image(path, 20) for path in data.train.paths()])
    np.testing.assert_array_equal(x, expected.astype(np.float32))  # the one decoder, in split order
    np.testing.assert_array_equal(y, data.train.y)
    np.testing.assert_array_equal(data.train.images([3, 0]), expected[[3, 0]])
    shuffled = _epoch(make_pipeline(data.train, batch_size=5, training=True, seed=3))
    assert sorted(map(bytes, shuffled[0].astype(np.uint8))) == sorted(map(bytes, expected))


def test_folder_fingerprint_hashes_paths_and_contents_not_timestamps(tmp_path):
    root = _jpeg_folder(tmp_path / "jpegs")
    cfg = _folder(root, size=16)
    before = load_dataset(cfg).fingerprint()
    first = root / "red" / "0.jpg"
    os.utime(first, (1, 1))  # a copy with other timestamps is the same data
    assert load_dataset(cfg).fingerprint() == before
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF  # one byte of image data
    first.write_bytes(bytes(data))
    changed = load_dataset(cfg).fingerprint()
    assert changed != before
    first.rename(root / "red" / "renamed.jpg")
    assert load_dataset(cfg).fingerprint() not in (before, changed)


def test_keras_and_synthetic_fingerprints_are_unchanged():
    """Pinned: the values the pixel-hashing fingerprint gave before folders streamed (runs keep verifying)."""
    assert load_dataset(DataConfig(synthetic_train=100, synthetic_test=50, seed=0)).fingerprint() == (
        "ad49f2e01e237551656d1505d6109db2e013a4007c6df33ef043f08848f067e7")
    limited = DataConfig(synthetic_train=300, synthetic_test=50, limit_train=40, seed=2)
    assert load_dataset(limited).fingerprint() == "9ff81972e13c8eb5551e987e5c83b69a79e7621afc71397b33cf4a11858f4898"


def test_a_file_that_stops_decoding_mid_run_is_replaced_with_one_warning(tmp_path, caplog):
    from transfer.evaluate import evaluate

    root = _jpeg_folder(tmp_path / "jpegs", per_class=8)
    data = load_dataset(_folder(root, val_split=0, test_split=0), image_size=16)
    broken = data.train.paths()[2]
    Path(broken).write_bytes(Path(broken).read_bytes()[:200])  # truncated after it was listed
    with caplog.at_level(logging.WARNING, logger="transfer"):
        ds = make_pipeline(data.train, batch_size=4, training=True, seed=0)
        for _ in range(2):
            _, y = _epoch(ds)  # never stops mid-epoch, keeps its length
            assert len(y) == len(data.train) == 16
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and broken in warnings[0]
    assert data.train.failed().tolist() == [i == 2 for i in range(16)]
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    assert evaluate(model, data.train, data.classes, batch_size=4)["samples"] == 15  # left out of the metrics


def test_cache_memory_and_dir_give_the_same_batches(tmp_path):
    root = _jpeg_folder(tmp_path / "jpegs")
    data = load_dataset(_folder(root, val_split=0, test_split=0), image_size=24)
    cache = tmp_path / "cache"

    def two_epochs(split):
        ds = make_pipeline(split, batch_size=5, training=True, seed=4)
        return [_epoch(ds) for _ in range(2)]

    plain = two_epochs(data.train)
    for value in ("memory", resolve_cache(str(cache))):
        cached = two_epochs(dataclasses.replace(data.train, cache=value))
        for (xa, ya), (xb, yb) in zip(plain, cached, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    entries = sorted((cache / "decoded-v1-24px").iterdir())
    assert len(entries) == 12 and all(e.stat().st_size == 24 * 24 * 3 for e in entries)
    shutil.rmtree(root)  # the DIR cache alone now feeds the pipeline
    np.testing.assert_array_equal(two_epochs(dataclasses.replace(data.train, cache=str(cache)))[0][0], plain[0][0])


def test_unwritable_cache_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(UserError, match=r"is not writable .*pass --cache DIR") as err:
            resolve_cache(str(bad))
        assert "\n" not in str(err.value)
    assert resolve_cache("memory") == "memory" and resolve_cache(str(tmp_path / "new" / "dir")).endswith("dir")
    assert not (tmp_path / "new").exists()  # checked, not created: a refused run leaves nothing behind
    root = _jpeg_folder(tmp_path / "jpegs")
    with pytest.raises(UserError, match="--cache"):  # refused while loading: before anything is built or trained
        load_dataset(DataConfig(dataset=f"folder:{root}", cache=str(tmp_path / "file" / "sub")))
    data = load_dataset(DataConfig(dataset=f"folder:{root}", folder_image_size=None, cache="memory"), image_size=16)
    assert data.train.cache == data.test.cache == "memory" and data.info["decode"]["cache"] == "memory"


def test_limit_train_is_a_stratified_seeded_subset():
    cfg = DataConfig(synthetic_train=300, synthetic_test=50, limit_train=40, seed=2)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert len(a.train) == 40 and set(np.bincount(a.train.y)) == {4}
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert len(a.val) == 30 and a.info["split"]["limit_train"] == 40
    with pytest.raises(UserError, match="limit_train=5 is smaller than the number of classes"):
        load_dataset(DataConfig(synthetic_train=300, synthetic_test=50, limit_train=5))


def test_fingerprint_is_stable_and_changes_with_the_seed():
    cfg = DataConfig(synthetic_train=100, synthetic_test=50, seed=0)
    other = DataConfig(synthetic_train=100, synthetic_test=50, seed=1)
    assert load_dataset(cfg).fingerprint() == load_dataset(cfg).fingerprint() != load_dataset(other).fingerprint()


def test_info_is_json_serialisable(tiny_synthetic):
    assert json.loads(json.dumps(tiny_synthetic.info))["counts"] == {"train": 160, "val": 40, "test": 100}


# ---------------------------------------------------------------------------------------------- pipelines


def _numbered_split(n: int) -> Split:
    """Images whose first pixel carries their index, so that pipelines can be checked sample by sample."""
    x = np.zeros((n, 8, 8, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return Split(x, (np.arange(n) % 10).astype(np.int64))


def test_training_pipeline_shuffles_every_epoch_without_dropping():
    split = _numbered_split(50)
    ds = make_pipeline(split, batch_size=16, training=True, seed=1)
    (x1, y1), (x2, y2) = _epoch(ds), _epoch(ds)
    assert [int(y.shape[0]) for _, y in ds] == [16, 16, 16, 2]
    assert x1.dtype == np.float32 and y1.dtype == np.int64 and x1.shape == (50, 8, 8, 3)
    ids1, ids2 = x1[:, 0, 0, 0].astype(int), x2[:, 0, 0, 0].astype(int)
    assert sorted(ids1) == sorted(ids2) == list(range(50))  # every sample once per epoch
    assert not np.array_equal(ids1, ids2)  # a new order each epoch
    assert sorted(y1) == sorted(y2) and np.array_equal(y1, ids1 % 10)
    again = _epoch(make_pipeline(split, batch_size=16, training=True, seed=1))[0][:, 0, 0, 0]
    np.testing.assert_array_equal(again, ids1)  # seeded


def test_a_training_stream_started_at_epoch_e_is_the_tail_of_the_one_started_at_0():
    """What resume relies on: epoch e's batches, augmentations included, do not depend on where the stream began."""
    from transfer.data.pipeline import training_stream

    split = _numbered_split(50)
    stream = training_stream(split, batch_size=16, augment=AugmentConfig("strong"), seed=3)
    from_zero = [(x.numpy(), y.numpy()) for x, y in stream(0).take(12)]  # epochs 0, 1, 2: 4 batches each
    from_one = [(x.numpy(), y.numpy()) for x, y in stream(1).take(8)]
    for (xa, ya), (xb, yb) in zip(from_zero[4:], from_one, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    labels = [np.concatenate([y for _, y in from_zero[e * 4:(e + 1) * 4]]) for e in range(3)]
    assert all(sorted(epoch) == sorted(split.y) for epoch in labels)  # every sample once per epoch
    assert not np.array_equal(labels[0], labels[1])  # a new order each epoch
    one = make_pipeline(split, batch_size=16, training=True, augment=AugmentConfig("strong"), seed=3, epoch=2)
    for (xa, _), (xb, _) in zip(from_zero[8:], one, strict=True):
        np.testing.assert_array_equal(xa, xb.numpy())  # the same as that one epoch's pipeline


def test_an_epoch_without_a_whole_global_batch_is_refused_in_one_line(tiny_synthetic):
    """Replicas drop partial batches: 160 images in global batches of 256 would be an epoch of no batch, on which
    the endless training stream would wait forever."""
    from transfer.config import TrainConfig
    from transfer.runner import training_pipelines

    with pytest.raises(UserError, match=r"has 160 images, fewer than one global batch of 256 .*lower --batch-size"):
        training_pipelines(tiny_synthetic, AugmentConfig("none"), TrainConfig(batch_size=256), replicas=2)
    _, _, steps = training_pipelines(tiny_synthetic, AugmentConfig("none"), TrainConfig(batch_size=256))
    assert steps == 1  # one replica keeps the partial batch


def test_streams_of_one_factory_share_the_memory_cache(tmp_path, monkeypatch):
    """A run's phases each start a stream: with --cache memory no file is decoded twice."""
    from transfer.data import folders
    from transfer.data.pipeline import training_stream

    data = load_dataset(_folder(_jpeg_folder(tmp_path / "jpegs"), val_split=0, test_split=0), image_size=24)
    decoded = []
    monkeypatch.setattr(folders, "decode_image", lambda path, size: decoded.append(path) or decode_image(path, size))
    stream = training_stream(dataclasses.replace(data.train, cache="memory"), batch_size=5, seed=0)
    batches = -(-len(data.train) // 5)
    first = [x.numpy() for x, _ in stream(0).take(2 * batches)]
    second = [x.numpy() for x, _ in stream(1).take(batches)]
    assert len(decoded) == len(set(decoded)) == len(data.train)
    for a, b in zip(first[batches:], second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_pipeline_is_in_order_and_unaugmented(tiny_synthetic):
    ds = make_pipeline(tiny_synthetic.test, batch_size=32, training=False, augment=AugmentConfig("strong"))
    for _ in range(2):
        x, y = _epoch(ds)
        np.testing.assert_array_equal(x, tiny_synthetic.test.x.astype(np.float32))
        np.testing.assert_array_equal(y, tiny_synthetic.test.y)


def test_training_pipeline_with_strong_augmentation_changes_pixels_within_range(tiny_synthetic):
    strong = AugmentConfig("strong")
    ds = make_pipeline(tiny_synthetic.train, batch_size=64, training=True, augment=strong, shuffle=False)
    x, y = _epoch(ds)
    assert x.shape == tiny_synthetic.train.x.shape and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 255.0
    np.testing.assert_array_equal(y, tiny_synthetic.train.y)
    assert np.abs(x - tiny_synthetic.train.x).mean() > 5


def test_augmenter_presets_and_overrides():
    assert build_augmenter(AugmentConfig("none")) is None
    strong = build_augmenter(AugmentConfig("strong"))
    batch = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    out = np.asarray(strong(batch, training=True))
    assert out.shape == batch.shape and not np.allclose(out, batch) and out.min() >= 0 and out.max() <= 255

    assert AugmentConfig("none", flip=True).resolved()["flip"] is True
    only_flip = build_augmenter(AugmentConfig("none", flip=True))
    assert [type(layer).__name__ for layer in only_flip.layers] == ["RandomFlip", "_ClipPixels"]
    no_rotation = build_augmenter(AugmentConfig("strong", rotation=0.0))
    assert "RandomRotation" not in [type(layer).__name__ for layer in no_rotation.layers]
    assert AugmentConfig("light", shift=0.3).resolved()["shift"] == 0.3
    assert build_augmenter(AugmentConfig("light", flip=False, shift=0.0)) is None


def test_invalid_augmentation_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'strong'"):
        AugmentConfig("stron").resolved()
    with pytest.raises(UserError, match="zoom=2"):
        AugmentConfig(zoom=2).resolved()
    with pytest.raises(UserError, match="flip"):
        AugmentConfig(flip="yes").resolved()  # type: ignore[arg-type]
    with pytest.raises(UserError, match="batch_size=0"):
        make_pipeline(_numbered_split(4), batch_size=0, training=False)
