"""PyTorch ``.pth`` files written without PyTorch, in both of its layouts, and crafted ones that try to run code.

The writer pickles exactly what ``torch.save`` pickles — ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, OrderedDict())`` with typed storages as persistent ids — through stand-in ``torch`` modules
that exist only while a file is written.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                 np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage"}


@contextlib.contextmanager
def _stand_in_torch():
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)


class _Tensor:
    def __init__(self, storage: _Storage, shape, stride, offset: int = 0):
        self.storage, self.shape, self.stride, self.offset = storage, tuple(shape), tuple(stride), offset

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.insert(0, step)
        step *= max(int(n), 1)
    return tuple(stride)


def _tensors(state: dict[str, np.ndarray]) -> tuple[collections.OrderedDict, list[_Storage]]:
    storages, out = [], collections.OrderedDict()
    for i, (name, array) in enumerate(state.items()):
        array = np.asarray(array)
        storage = _Storage(str(i), array)
        storages.append(storage)
        out[name] = _Tensor(storage, array.shape, _contiguous_stride(array.shape))
    return out, storages


class _Pickler(pickle.Pickler):
    def __init__(self, file, torch, legacy: bool):
        super().__init__(file, protocol=2)
        self.torch, self.legacy = torch, legacy

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = getattr(self.torch, STORAGE_NAMES[obj.array.dtype])
            record = ("storage", kind, obj.key, "cpu", obj.array.size)
            return (*record, None) if self.legacy else record
        return None


def write_legacy(path: Path, state: dict[str, np.ndarray], *, payload=None) -> Path:
    """``state`` as ``torch.save(state, path, _use_new_zipfile_serialization=False)`` writes it; ``payload`` (any
    object) is pickled in the state dict's place when given."""
    tensors, storages = _tensors(state)
    buffer = io.BytesIO()
    with _stand_in_torch() as torch:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                            "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, buffer, protocol=2)
        _Pickler(buffer, torch, True).dump(tensors if payload is None else payload)
        pickle.dump([s.key for s in storages] if payload is None else [], buffer, protocol=2)
        if payload is None:
            for storage in storages:
                little = storage.array.astype(storage.array.dtype.newbyteorder("<"))
                buffer.write(struct.pack("<q", storage.array.size) + little.tobytes())
    Path(path).write_bytes(buffer.getvalue())
    return Path(path)


def write_zip(path: Path, state: dict[str, np.ndarray]) -> Path:
    """``state`` as ``torch.save(state, path)`` (PyTorch >= 1.6) writes it: ``archive/data.pkl`` + ``data/<key>``."""
    tensors, storages = _tensors(state)
    buffer = io.BytesIO()
    with _stand_in_torch() as torch:
        _Pickler(buffer, torch, False).dump(tensors)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/version", "3\n")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())
    return Path(path)


class RunsCommand:
    """Unpickling this runs ``os.system(command)``: what a crafted .pth file does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_evil(path: Path, marker: Path) -> Path:
    """A legacy .pth whose state dict is a call to ``os.system`` that would create ``marker``."""
    return write_legacy(path, {}, payload=collections.OrderedDict(x=RunsCommand(f"touch {marker}")))
