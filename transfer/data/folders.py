"""Image folders as datasets: one sub-folder per class, optionally already split into train/ (val/, test/).

A folder is never decoded into memory as a whole. Loading lists the files, reads each once to check it (Pillow
``open`` and ``verify``, no pixel decoding) and to take its sha256, and splits the list (seeded, stratified, as for
every source). Each split is a :class:`FileSplit`: relative paths, content digests and labels. Pixels are decoded
on demand, by the one decoder (:func:`transfer.images.decode_image`), at the size the model takes
(:meth:`transfer.data.splits.Dataset.for_model`): in a parallel tf.data pipeline for training and evaluation
(:mod:`transfer.data.pipeline`), by :meth:`FileSplit.images` for anything else (export calibration, verification).

A folder's fingerprint hashes its files' relative paths and contents (not pixels): it does not depend on the size the
files are decoded at, survives copying the folder elsewhere with other timestamps, and changes when any byte does.

Pillow and NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from transfer import rundir
from transfer.config import DataConfig
from transfer.data.splits import SEED_TEST, SEED_VAL, Dataset, assemble, carve, share
from transfer.errors import UserError
from transfer.images import DECODE_ERRORS, decode_image

log = logging.getLogger("transfer")

FOLDER_PREFIX = "folder:"  # a dataset name of this form is a folder of class sub-folders
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
SKIPPED_SHOWN = 5  # how many skipped file names the warning and info["skipped"] list
CACHE_NONE, CACHE_MEMORY = "none", "memory"  # --cache values besides a directory
CACHE_FORMAT = 1  # in the --cache DIR layout: bump when decode_image's output changes, so old pixels are never read
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_IO_THREADS = min(32, 4 * (os.cpu_count() or 1))  # listing reads files: I/O bound, hashing releases the GIL
_SUBSTITUTE_TRIES = 16  # a file that fails to decode mid-run is replaced by one of its class's next files


# ---------------------------------------------------------------------------------------------- the split of files


@dataclass
class FileSplit:
    """One split of an image folder: files (relative to ``root``), their sha256 digests and labels; no pixels.

    ``size`` is the square side the files are decoded at (None until :meth:`Dataset.for_model` sets it); ``cache``
    is the resolved ``--cache`` (``none``, ``memory`` or an absolute directory) the tf.data pipeline applies.
    """

    root: str
    files: np.ndarray  # (N,) str: paths relative to root
    digests: np.ndarray  # (N, 32) uint8: sha256 of each file's bytes
    y: np.ndarray  # (N,) int64 labels
    size: int | None = None
    cache: str = CACHE_NONE
    streamed = True  # pixels are decoded from files as they are read

    def __len__(self) -> int:
        return len(self.y)

    def paths(self) -> list[str]:
        """Absolute paths of the files, in split order."""
        return [os.path.join(self.root, name) for name in self.files.tolist()]

    def take(self, index: np.ndarray) -> FileSplit:
        """The files at ``index``, decoded at the same size."""
        index = np.asarray(index, np.int64)
        return dataclasses.replace(self, files=self.files[index], digests=self.digests[index], y=self.y[index])

    def at_size(self, size: int) -> FileSplit:
        """The same files, decoded at ``size`` x ``size``."""
        return dataclasses.replace(self, size=int(size))

    def images(self, index: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """uint8 RGB pixels (len(index), size, size, 3) of the files at ``index`` (all when None), decoded in
        parallel; a file that no longer decodes is a UserError naming it."""
        if self.size is None:
            raise ValueError("this split has no decode size yet: call Dataset.for_model(image_size) first")
        chosen = np.arange(len(self)) if index is None else np.asarray(index, np.int64)
        paths = self.paths()
        out = np.empty((len(chosen), self.size, self.size, 3), np.uint8)

        def decode_into(k: int) -> None:
            path = paths[int(chosen[k])]
            try:
                out[k] = decode_image(path, self.size)
            except DECODE_ERRORS as e:
                raise UserError(f"cannot decode {path}: {type(e).__name__}: {e}".replace("\n", " ")) from e

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow decodes with the GIL released
            list(pool.map(decode_into, range(len(chosen))))
        return out

    @functools.cached_property
    def x(self) -> np.ndarray:
        """Every image of the split, decoded once on first use and kept: for small splits only (training and
        evaluation stream; prefer :meth:`images` with the indices needed)."""
        return self.images()

    def content_digest(self) -> bytes:
        """This split's part of the dataset fingerprint: labels, relative paths and file contents (not pixels)."""
        content = hashlib.sha256(b"files")
        content.update(np.ascontiguousarray(self.y, dtype="<i8").data)
        for name, digest in zip(self.files.tolist(), self.digests, strict=True):
            content.update(name.encode("utf-8", "surrogateescape") + b"\0")
            content.update(digest.tobytes())
        return content.digest()

    def failed(self) -> np.ndarray:
        """Which files failed to decode while this process read them (see :func:`file_decoder`)."""
        with _FAILED_LOCK:
            return np.array([path in _FAILED for path in self.paths()], bool)


# ---------------------------------------------------------------------------------------------- decoding on demand

_FAILED: dict[str, str] = {}  # absolute path -> why it failed to decode (after it had passed the listing check)
_FAILED_LOCK = threading.Lock()


def _record_failure(path: str, error: BaseException) -> None:
    reason = f"{type(error).__name__}: {error}".replace("\n", " ")
    with _FAILED_LOCK:
        new = path not in _FAILED
        _FAILED[path] = reason
    if new:
        log.warning("cannot decode %s (%s); it is replaced by another image of its class from now on (and left "
                    "out of evaluation metrics)", path, reason)


def _cache_dir(split: FileSplit) -> Path | None:
    if split.cache in (CACHE_NONE, CACHE_MEMORY):
        return None
    return Path(split.cache) / f"decoded-v{CACHE_FORMAT}-{split.size}px"


def file_decoder(split: FileSplit) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """``decode(i) -> (uint8 (size, size, 3) image, int64 label)`` of the split's file ``i``, thread-safe.

    A file that fails to decode is recorded (one warning each) and replaced by the next file of its class that
    decodes, with that file's label (the same class), so a pipeline never stops and keeps its length. With a
    ``--cache`` directory, decoded pixels are kept there as raw files named by the file's content digest and size
    (written atomically: concurrent runs and a killed run never leave a partial file where it is read). With
    ``--cache memory`` the decoder keeps every image it decoded, for its lifetime: one pipeline's, or every phase
    of a run's training stream.
    """
    size = split.size
    if size is None:
        raise ValueError("this split has no decode size yet: call Dataset.for_model(image_size) first")
    paths = split.paths()
    labels = split.y
    names = [digest.tobytes().hex() for digest in split.digests]
    cache = _cache_dir(split)
    nbytes = size * size * 3
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}

    kept: dict[int, np.ndarray] | None = {} if split.cache == CACHE_MEMORY else None

    def decode_one(i: int) -> np.ndarray:
        image = None if kept is None else kept.get(i)
        if image is None:
            image = read_or_decode(i)
            if kept is not None:
                kept[i] = image  # a dict item set is atomic: decoding threads share it without a lock
        return image

    def read_or_decode(i: int) -> np.ndarray:
        entry = None if cache is None else cache / f"{names[i]}.rgb"
        if entry is not None:
            try:
                data = entry.read_bytes()
                if len(data) == nbytes:
                    return np.frombuffer(data, np.uint8).reshape(size, size, 3)
            except OSError:
                pass
        image = decode_image(paths[i], size)
        if entry is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{names[i]}.", suffix=".tmp")
                with os.fdopen(fd, "wb") as handle:
                    handle.write(image.tobytes())
                os.replace(tmp, entry)
            except OSError as e:  # a full disk must not stop training: it only stops caching
                log.warning("cannot write the decode cache in %s (%s); decoding without it", cache, e)
        return image

    def decode(i) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        same_class = by_class[int(labels[i])]
        start = int(np.searchsorted(same_class, i))
        for k in range(min(_SUBSTITUTE_TRIES, len(same_class))):
            j = int(same_class[(start + k) % len(same_class)])
            try:
                return decode_one(j), labels[j]
            except DECODE_ERRORS as e:
                _record_failure(paths[j], e)
        return np.zeros((size, size, 3), np.uint8), labels[i]

    return decode


def resolve_cache(value: str) -> str:
    """``--cache``: ``none``, ``memory`` or a directory, which must be writable (checked as ``--artifacts`` is, creating
    nothing: it is made on first write); returns the directory as an absolute path. Anything else is a one-line
    UserError, before anything trains."""
    if value in (CACHE_NONE, CACHE_MEMORY):
        return value
    if not value.strip():
        raise UserError(f"--cache needs a value: '{CACHE_NONE}', '{CACHE_MEMORY}' or a writable directory")
    path = Path(value).expanduser().absolute()
    rundir.check_writable(path, "--cache")
    return str(path)


# ---------------------------------------------------------------------------------------------- listing a folder


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


def _check(path: Path) -> bytes | None:
    """The sha256 of a file Pillow can open (header and, where the format has them, checksums verified; no pixel
    decoding); None for a file that is unreadable or no image."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except DECODE_ERRORS:
        return None
    return hashlib.sha256(data).digest()


def _read_folder(folder: Path, classes: Sequence[str], root: Path, skipped: list[str], cache: str) -> FileSplit:
    """The readable image files of ``folder``/<class>/; unreadable ones are appended (relative to root) to
    ``skipped``."""
    present = _class_folders(folder)
    strangers = sorted(set(present) - set(classes))
    if strangers:
        raise UserError(f"{folder} has class folders not in the training classes: {', '.join(strangers)}")
    files = [
        (label, path) for label, name in enumerate(classes) if name in present for path in _image_files(folder / name)
    ]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        digests = list(pool.map(lambda item: _check(item[1]), files))
    readable = np.zeros(len(classes), np.int64)
    for (label, path), digest in zip(files, digests, strict=True):
        if digest is None:
            skipped.append(str(path.relative_to(root)))
        else:
            readable[label] += 1
    for label, name in enumerate(classes):
        if name in present and readable[label] == 0:
            raise UserError(
                f"class '{name}' has no readable images in {folder / name} "
                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    kept = [(label, path, digest) for (label, path), digest in zip(files, digests, strict=True) if digest is not None]
    return FileSplit(
        root=str(root),
        files=np.array([str(path.relative_to(root)) for _, path, _ in kept], dtype=str),
        digests=np.array([np.frombuffer(digest, np.uint8) for _, _, digest in kept], np.uint8).reshape(-1, 32),
        y=np.array([label for label, _, _ in kept], np.int64),
        cache=cache,
    )


def load_folder(given: str, cfg: DataConfig) -> Dataset:
    """The folder ``given`` (the dataset name without ``folder:``): class sub-folders, optionally already split
    into train/ (val/, test/) sub-folders; missing val/test splits are carved, seeded and stratified.

    The splits hold files, decoded at ``--folder-image-size`` when it is given; otherwise the dataset has no native
    shape yet and :meth:`Dataset.for_model` decodes it at the model's input size.
    """
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
    cache = resolve_cache(getattr(cfg, "cache", CACHE_NONE))
    skipped: list[str] = []
    splits = {split: _read_folder(folder, classes, root, skipped, cache) for split, folder in layout.items()}
    if "train" not in layout:
        whole = _read_folder(root, classes, root, skipped, cache)
        n_val, n_test = share(len(whole), cfg.val_split), share(len(whole), cfg.test_split)  # both of the whole
        rest, splits["test"] = carve(whole, n_test, (cfg.seed, SEED_TEST), classes, "test")
        splits["train"], splits["val"] = carve(rest, n_val, (cfg.seed, SEED_VAL), classes, "val")
        sources = {"val": "carved from the folder", "test": "carved from the folder"}
    else:
        sources = {split: f"{layout[split].name}/" for split in ("val", "test") if split in layout}
        if "test" not in splits:
            n_test = share(len(splits["train"]), cfg.test_split)
            splits["train"], splits["test"] = carve(splits["train"], n_test, (cfg.seed, SEED_TEST), classes, "test")
            sources["test"] = "carved from train/"
        if "val" not in splits:
            n_val = share(len(splits["train"]), cfg.val_split)
            splits["train"], splits["val"] = carve(splits["train"], n_val, (cfg.seed, SEED_VAL), classes, "val")
            sources["val"] = "carved from train/"
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (", ..." if len(skipped) > SKIPPED_SHOWN else "")
        log.warning("skipped %d unreadable image file(s) in %s: %s", len(skipped), root, shown)
    info = {"source": str(root), "skipped": {"count": len(skipped), "files": skipped[:SKIPPED_SHOWN]}}
    dataset = assemble(f"{FOLDER_PREFIX}{root}", classes, splits, None, cfg, info, sources)
    given_size = getattr(cfg, "folder_image_size", None)
    return dataset if given_size is None else dataset.decoded_at(given_size, "--folder-image-size")
