"""Image folders as datasets: one sub-folder per class, optionally already split into train/ (val/, test/).

Pillow and NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from transfer.config import DataConfig
from transfer.data.splits import SEED_TEST, SEED_VAL, Dataset, Split, assemble, carve, share
from transfer.errors import UserError
from transfer.images import DECODE_ERRORS, decode_image

log = logging.getLogger("transfer")

FOLDER_PREFIX = "folder:"  # a dataset name of this form is a folder of class sub-folders
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
SKIPPED_SHOWN = 5  # how many skipped file names the warning and info["skipped"] list
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


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
    except DECODE_ERRORS:
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


def load_folder(given: str, cfg: DataConfig) -> Dataset:
    """The folder ``given`` (the dataset name without ``folder:``): class sub-folders, optionally already split
    into train/ (val/, test/) sub-folders; missing val/test splits are carved, seeded and stratified."""
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
    return assemble(f"{FOLDER_PREFIX}{root}", classes, splits, (size, size, 3), cfg, info, sources)
