"""Read PyTorch ``.pth`` state dicts with NumPy alone, never running code from the file.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. This reader's unpickler resolves
exactly the names a saved tensor needs (``torch._utils._rebuild_tensor_v2`` and friends, the typed storage classes,
``collections.OrderedDict``) to functions of its own that build plain data, and refuses every other name before
anything is called. Tensors come back as NumPy arrays, checked to lie inside their storage.

Both of PyTorch's file layouts are read: the legacy one (a stream of pickles followed by the raw storages, what
``torch.save(..., _use_new_zipfile_serialization=False)`` and PyTorch < 1.6 wrote) and the zip archive of PyTorch
>= 1.6 (``archive/data.pkl`` plus one ``archive/data/<key>`` file per storage).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION

# torch's typed storage classes and the dtypes they hold (bfloat16 has no NumPy dtype: refused)
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
MAX_TENSOR_DIMS = 8


class UnsafeFileError(ValueError):
    """The file is not a plain state dict of tensors: it names code to run, or its structure does not add up."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """One storage the pickle refers to; its bytes arrive after the pickle (legacy) or from the archive (zip)."""

    def __init__(self, kind: _StorageType, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel
        self.data: np.ndarray | None = None

    def fill(self, raw: bytes) -> None:
        if len(raw) != self.numel * self.kind.dtype.itemsize:
            raise UnsafeFileError(f"storage {self.key} holds {len(raw)} bytes, its header says "
                                  f"{self.numel} x {self.kind.dtype.itemsize}")
        self.data = np.frombuffer(raw, dtype=self.kind.dtype.newbyteorder("<")).astype(self.kind.dtype)


class _Tensor:
    """A tensor waiting for its storage's bytes: ``_rebuild_tensor_v2``'s arguments, checked."""

    def __init__(self, storage, offset, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise UnsafeFileError("a tensor's storage is not a storage record")
        shape, strides = _ints(size, "size"), _ints(stride, "stride")
        if len(shape) != len(strides) or len(shape) > MAX_TENSOR_DIMS:
            raise UnsafeFileError(f"tensor size {shape} and stride {strides} do not match")
        if not isinstance(offset, int) or offset < 0 or any(s < 0 for s in (*shape, *strides)):
            raise UnsafeFileError("negative tensor offset, size or stride")
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) if all(shape) else offset - 1
        if last >= storage.numel:
            raise UnsafeFileError(f"tensor of size {shape} at offset {offset} reaches past its storage "
                                  f"of {storage.numel} elements")
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise UnsafeFileError(f"storage {self.storage.key} has no data in the file")
        if not all(self.shape):
            return np.zeros(self.shape, dtype=data.dtype)
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.shape,
                                               strides=tuple(s * item for s in self.strides), writeable=False)
        return np.array(view)


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UnsafeFileError(f"tensor {what} is not a tuple of integers")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(data, _Tensor):
        raise UnsafeFileError("a parameter wraps something other than a tensor")
    return data


def _ordered_dict(*args):
    if args:
        raise UnsafeFileError("OrderedDict built with arguments")
    return collections.OrderedDict()


# Every name the unpickler resolves; anything else is refused before it could run.
_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage], zip_layout: bool):
        super().__init__(file)
        self.storages, self.zip_layout = storages, zip_layout

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"the file names {module}.{name}, which a state dict of tensors never needs "
                                  "(refused: unpickling it could run code)") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeFileError(f"unknown persistent record {str(pid)[:60]!r}")
        # legacy: (storage, type, key, location, numel, view_metadata); zip: (storage, type, key, location, numel)
        if len(pid) not in (5, 6) or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int) \
                or isinstance(pid[4], bool) or pid[4] < 0:
            raise UnsafeFileError("malformed storage record")
        if len(pid) == 6 and pid[5] is not None:
            raise UnsafeFileError("storage views are not supported")
        key = str(pid[2])
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(pid[1], key, pid[4])
        elif storage.kind.name != pid[1].name or storage.numel != pid[4]:
            raise UnsafeFileError(f"storage {key} is described two ways")
        return storage


def _materialise(value):
    if isinstance(value, _Tensor):
        return value.array()
    if isinstance(value, dict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(_materialise(v) for v in value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise UnsafeFileError(f"unexpected object of type {type(value).__name__} in the file")


def load(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict saved in ``path`` (``{name: array}``), read without PyTorch and without running any code.

    Raises :class:`UnsafeFileError` for a file that names anything but tensors and plain containers, and
    ``ValueError`` for one that is truncated or not a PyTorch file.
    """
    path = Path(path)
    result = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    state = result.get("state_dict", result) if isinstance(result, dict) else result
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UnsafeFileError("the file holds no state dict ({name: tensor})")
    return collections.OrderedDict((k, v) for k, v in state.items() if isinstance(v, np.ndarray))


def _load_legacy(path: Path):
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        try:
            if _Unpickler(f, storages, False).load() != LEGACY_MAGIC:
                raise ValueError("not a PyTorch file (no magic number)")
            if _Unpickler(f, storages, False).load() != LEGACY_PROTOCOL:
                raise ValueError("unsupported PyTorch file protocol")
            info = _Unpickler(f, storages, False).load()
            if not isinstance(info, dict) or info.get("little_endian") is not True:
                raise ValueError("not a little-endian PyTorch file")
            result = _Unpickler(f, storages, False).load()
            keys = _Unpickler(f, storages, False).load()
        except UnsafeFileError:
            raise
        except (pickle.UnpicklingError, EOFError, struct.error, TypeError, AttributeError, IndexError,
                KeyError, ValueError) as exc:
            raise ValueError(f"not a readable PyTorch file ({type(exc).__name__}: {str(exc)[:80]})") from exc
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise UnsafeFileError("the storage list does not match the storages the tensors use")
        for key in keys:
            header = f.read(8)
            if len(header) != 8:
                raise ValueError(f"truncated file: storage {key} is missing")
            (numel,) = struct.unpack("<q", header)
            storage = storages[str(key)]
            if numel != storage.numel:
                raise UnsafeFileError(f"storage {key} holds {numel} elements, the pickle says {storage.numel}")
            raw = f.read(numel * storage.kind.dtype.itemsize)
            if len(raw) != numel * storage.kind.dtype.itemsize:
                raise ValueError(f"truncated file: storage {key} is cut short")
            storage.fill(raw)
    return _materialise(result)


def _load_zip(path: Path):
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError("not a PyTorch zip file (no single <archive>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            result = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages, True).load()
        except UnsafeFileError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError,
                ValueError) as exc:
            raise ValueError(f"not a readable PyTorch file ({type(exc).__name__}: {str(exc)[:80]})") from exc
        for key, storage in storages.items():
            try:
                storage.fill(archive.read(f"{prefix}data/{key}"))
            except KeyError:
                raise ValueError(f"truncated file: storage {key} is missing from the archive") from None
    return _materialise(result)
