"""Safe, torch-free reader for PyTorch checkpoint files (state dicts and TorchScript archives).

PyTorch's zip format stores each storage as raw bytes under `<archive>/data/<key>` and the
object tree as a pickle (`<archive>/data.pkl`). Plain pickle would execute whatever the
file names, so this module unpickles with an allow-list: tensors, ordered dicts,
TorchScript's plain list builders, and `__torch__.*` module objects (archives from
`torch.jit.script` or `torch.jit.trace`, as OpenAI ships CLIP), which become inert
attribute bags. Anything else is refused.

The file is treated as hostile: the pickle's opcodes are scanned before unpickling (a
crafted memo index cannot make the unpickler allocate gigabytes); each storage must be
in the archive with exactly the bytes its pickle entry declares (zipfile checks the
CRC-32); each tensor's offset, sizes and strides must stay inside its storage before any
view is made; and the storages read, like the tensors returned, may not take more bytes
than the file. Every failure is a `ReadError` (a ValueError) naming the file and, where
there is one, the entry. No torch import is needed, so `clip.load("ViT-B-32.pt")` works
in a JAX-only environment.
"""

import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import zipfile

import ml_dtypes
import numpy as np


class ReadError(ValueError):
    """A PyTorch file that cannot be read safely; the message names the file and the entry."""


_StorageType = collections.namedtuple("_StorageType", ["name", "dtype"])
_STORAGE_TYPES = {
    name: _StorageType(name, np.dtype(dtype))
    for name, dtype in (
        ("FloatStorage", np.float32),
        ("DoubleStorage", np.float64),
        ("HalfStorage", np.float16),
        ("BFloat16Storage", ml_dtypes.bfloat16),
        ("LongStorage", np.int64),
        ("IntStorage", np.int32),
        ("ShortStorage", np.int16),
        ("CharStorage", np.int8),
        ("ByteStorage", np.uint8),
        ("BoolStorage", np.bool_),
    )
}
# Immutable records, so that pickle opcodes (BUILD, SETITEM) cannot alter them after the
# checks: a storage's bytes, and a tensor already checked against them.
_Storage = collections.namedtuple("_Storage", ["key", "dtype", "data"])
_TensorRef = collections.namedtuple("_TensorRef", ["storage", "offset", "shape", "strides"])

_MAX_DIMS = 64  # numpy's limit
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short(value):
    """A bounded repr of a value taken from the file, for error messages."""
    return _REPR.repr(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_list(value):
    """TorchScript's `torch.jit._pickle.build_*list`: plain list constructors."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, found {type(value).__name__}")
    return value


def _restore_type_tag(value, type_str):
    """TorchScript's `torch.jit._pickle.restore_type_tag`: the value, untouched."""
    del type_str
    return value


class _TorchScriptObject:
    """An inert stand-in for a pickled TorchScript module: just its attributes."""

    __slots__ = ("attributes",)

    def __new__(cls, *args):
        del args
        obj = super().__new__(cls)
        obj.attributes = {}
        return obj

    def __setstate__(self, state):
        if isinstance(state, dict):
            if not all(isinstance(k, str) for k in state):
                raise TypeError("module attribute names must be strings")
            self.attributes = dict(state)


def _rebuild_parameter(data, *unused):
    del unused
    if not isinstance(data, _TensorRef):
        raise TypeError(f"a parameter must wrap a tensor, found {type(data).__name__}")
    return data


class _Unpickler(pickle.Unpickler):
    """Unpickler that only builds checked tensors, containers and inert TorchScript objects."""

    def __init__(self, data, *, read_entry, prefix, path):
        super().__init__(io.BytesIO(data))
        self._read_entry = read_entry
        self._prefix = prefix
        self._path = path
        self._storages = {}

    def _error(self, message):
        return ReadError(f"{self._path}: {message}")

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch.jit._pickle" and name in (
                "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"):
            return _plain_list
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return _restore_type_tag
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name.endswith("Storage"):
            raise self._error(f"storage type {_short(name)} is not supported; expected one of "
                              f"{sorted(_STORAGE_TYPES)}")
        if module.startswith("__torch__"):
            return _TorchScriptObject
        raise self._error(f"refusing to load {_short(f'{module}.{name}')}: only tensors and "
                          "module state are read from PyTorch checkpoints")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and _is_int(pid[4]) and pid[4] >= 0):
            raise self._error(
                f"unsupported persistent id {_short(pid)}; expected ('storage', <storage "
                "type>, <key>, <location>, <element count>)")
        _, storage_type, key, _, numel = pid
        if key in self._storages:
            storage = self._storages[key]
            if (storage.dtype != storage_type.dtype
                    or len(storage.data) != numel * storage.dtype.itemsize):
                raise self._error(f"storage {_short(key)} is declared twice with different "
                                  "types or sizes")
            return storage
        name = f"{self._prefix}data/{key}"
        data = self._read_entry(name, what=f"storage {_short(key)}")
        expected = numel * storage_type.dtype.itemsize
        if len(data) != expected:
            raise self._error(
                f"storage {_short(key)} ({name}) holds {len(data)} bytes, but the pickle "
                f"declares {numel} {storage_type.name} elements ({expected} bytes)")
        self._storages[key] = _Storage(key, storage_type.dtype, data)
        return self._storages[key]

    def _rebuild_tensor(self, storage, offset, size, stride, *unused):
        """torch._utils._rebuild_tensor(_v2): checks the view, returns a _TensorRef."""
        del unused  # requires_grad, backward hooks, metadata: not needed for weights
        if not isinstance(storage, _Storage):
            raise self._error(f"a tensor's storage must come from the archive, found "
                              f"{type(storage).__name__}")
        desc = f"tensor on storage {_short(storage.key)}"
        if not (_is_int(offset) and offset >= 0):
            raise self._error(f"{desc}: storage offset {_short(offset)} is not an int >= 0")
        for label, dims in (("size", size), ("stride", stride)):
            if not (isinstance(dims, (tuple, list)) and len(dims) <= _MAX_DIMS
                    and all(_is_int(d) and d >= 0 for d in dims)):
                raise self._error(f"{desc}: {label} {_short(dims)} is not a sequence of at "
                                  f"most {_MAX_DIMS} ints >= 0")
        if len(size) != len(stride):
            raise self._error(f"{desc}: size {_short(size)} and stride {_short(stride)} "
                              "differ in length")
        shape = tuple(size)
        # Strides of dimensions of size <= 1 are never used; zero keeps them in range.
        strides = tuple(s if n > 1 else 0 for n, s in zip(shape, stride))
        available = len(storage.data) // storage.dtype.itemsize
        if math.prod(shape) == 0:
            fits = offset <= available
        else:
            fits = offset + sum((n - 1) * s for n, s in zip(shape, strides)) < available
        if not fits:
            raise self._error(
                f"{desc} (offset {offset}, size {_short(size)}, stride {_short(stride)}) "
                f"does not fit in the storage's {available} elements")
        return _TensorRef(storage, offset, shape, strides)


def _scan_pickle(data, path):
    """Parses every opcode without running any, and bounds the memo indices.

    The C unpickler grows its memo to twice a PUT's index, so one crafted index could
    allocate and zero gigabytes; a real pickle's indices are below its length in bytes.
    """
    try:
        ops = list(pickletools.genops(data))
    except ValueError as e:
        raise ReadError(f"{path}: data.pkl is not a valid pickle ({e})") from e
    for opcode, arg, pos in ops:
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg >= len(data):
            raise ReadError(f"{path}: data.pkl: memo index {arg} at byte {pos} exceeds the "
                            f"pickle's length {len(data)}")


def _module_tensors(root):
    """Flattens a TorchScript module's tensor attributes to `{dotted.name: tensor}`.

    A module object reached twice (shared, or a cycle in a crafted file) is read once,
    under its first name, as torch's `named_parameters()` does.
    """
    out, seen, stack = {}, {id(root)}, [("", root)]
    while stack:
        prefix, obj = stack.pop()
        for name, value in obj.attributes.items():
            if isinstance(value, _TensorRef):
                out[prefix + name] = value
            elif isinstance(value, _TorchScriptObject) and id(value) not in seen:
                seen.add(id(value))
                stack.append((f"{prefix}{name}.", value))
    return out


def _materialize(refs, path, budget):
    """Copies each checked view out of its storage; shared tensors stay shared.

    Together the tensors may not take more bytes than the file (a zero-size dimension
    counts as 1 here, so huge empty shapes are refused too).
    """
    distinct = {id(r): r for r in refs.values()}
    span = {i: math.prod(max(d, 1) for d in r.shape) * r.storage.dtype.itemsize
            for i, r in distinct.items()}
    if sum(span.values()) > budget:
        largest = max(refs, key=lambda name: span[id(refs[name])])
        raise ReadError(
            f"{path}: the tensors would take {sum(span.values())} bytes, more than the "
            f"{budget}-byte file holds (overlapping or broadcast views are not supported); "
            f"the largest is {_short(largest)} with shape {_short(refs[largest].shape)}")
    arrays = {}
    for i, ref in distinct.items():
        dtype = ref.storage.dtype
        is_bool = dtype == np.bool_
        storage = np.frombuffer(ref.storage.data, dtype=np.uint8 if is_bool else dtype)
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset:], shape=ref.shape,
            strides=tuple(s * dtype.itemsize for s in ref.strides), writeable=False)
        # Any nonzero byte is True, as in torch; numpy would keep the raw byte.
        arrays[i] = view != 0 if is_bool else view.copy()
    return {name: arrays[id(ref)] for name, ref in refs.items()}


def _read(path):
    if not zipfile.is_zipfile(path):
        raise ReadError(
            f"{path}: not a PyTorch zip checkpoint (legacy non-zip torch.save files are not "
            "supported; re-save it with a recent torch.save)")
    budget = os.path.getsize(path)
    read_so_far = 0
    with zipfile.ZipFile(path) as archive:

        def read_entry(name, *, what):
            nonlocal read_so_far
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise ReadError(f"{path}: {what}: {name} is missing from the archive") from None
            if max(info.file_size, info.compress_size) + read_so_far > budget:
                raise ReadError(f"{path}: {what}: {name} declares {info.file_size} bytes; "
                                f"with the entries already read that exceeds the file's "
                                f"{budget} bytes")
            data = archive.read(info)  # raises BadZipFile on a CRC-32 mismatch
            read_so_far += len(data)
            return data

        pickles = [n for n in archive.namelist()
                   if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ReadError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            order = read_entry(f"{prefix}byteorder", what="byte order")
            if order != b"little":
                raise ReadError(f"{path}: byte order {_short(order)} is not supported; "
                                "expected b'little'")
        data = read_entry(pickles[0], what="pickle")
        _scan_pickle(data, path)
        root = _Unpickler(data, read_entry=read_entry, prefix=prefix, path=path).load()
    if isinstance(root, _TorchScriptObject):
        refs = _module_tensors(root)
    else:
        for key in ("state_dict", "model_state_dict"):  # training checkpoints nest it
            if isinstance(root, dict) and isinstance(root.get(key), dict):
                root = root[key]
                break
        if not isinstance(root, dict):
            raise ReadError(f"{path}: expected a state dict, found {type(root).__name__}")
        refs = {k: v for k, v in root.items() if isinstance(v, _TensorRef)}
        if not all(isinstance(k, str) for k in refs):
            raise ReadError(f"{path}: state dict keys must be strings")
        if all(k.startswith("module.") for k in refs):
            refs = {k[len("module."):]: v for k, v in refs.items()}
    return _materialize(refs, path, budget)


def read_state_dict(path):
    """Reads a PyTorch zip checkpoint into `{name: np.ndarray}`.

    Args:
      path: a `torch.save` state dict (possibly nested under "state_dict" or
        "model_state_dict", as training checkpoints are) or a TorchScript archive
        (`torch.jit.save` of a scripted or traced module, as OpenAI ships CLIP).

    Returns:
      A flat dict from parameter name to a numpy array in the stored dtype.

    Raises:
      ReadError: the file is not a readable PyTorch checkpoint, names anything other than
        tensors and module state, or is corrupted; the message names the file.
    """
    path = str(path)
    try:
        return _read(path)
    except ReadError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile, pickle, numpy: any failure on bad bytes)
        raise ReadError(f"{path}: corrupted or unsupported PyTorch file "
                        f"({type(e).__name__}: {str(e)[:300]})") from e
