"""``--dataset digits``: real images bundled with scikit-learn, split like a folder; ``transfer datasets``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transfer.cli import main
from transfer.config import DataConfig
from transfer.data import load_dataset
from transfer.errors import UserError


def test_digits_are_real_bundled_images_split_seeded_and_stratified():
    data = load_dataset(DataConfig(dataset="digits", val_split=0.1, test_split=0.2, seed=3))
    assert data.native_shape == (8, 8, 3) and data.classes == [str(d) for d in range(10)]
    assert (len(data.train), len(data.val), len(data.test)) == (1258, 180, 359)  # 1,797 scans in all
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == np.uint8 and set(np.unique(split.y)) == set(range(10))  # every class everywhere
        assert np.array_equal(split.x[..., 0], split.x[..., 2])  # greyscale scans as RGB
    assert data.train.x.max() == 255 and len(np.unique(data.train.x)) == 17  # 16 grey levels + 0, scaled
    again = load_dataset(DataConfig(dataset="digits", val_split=0.1, test_split=0.2, seed=3))
    other = load_dataset(DataConfig(dataset="digits", val_split=0.1, test_split=0.2, seed=4))
    assert again.fingerprint() == data.fingerprint() != other.fingerprint()


def test_digits_without_scikit_learn_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UserError, match=r"needs scikit-learn.*pip install"):
        load_dataset(DataConfig(dataset="digits"))


def test_datasets_command_lists_every_source(capsys):
    from transfer.data.sources import SOURCES

    assert main(["datasets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [s.name for s in SOURCES]
    assert {"digits", "cifar10", "synthetic", "folder:PATH"} <= {r["name"] for r in rows}
    assert all(r["description"] for r in rows)
