"""Safe, torch-free reader for PyTorch checkpoint files (state dicts and TorchScript archives).

PyTorch's zip format stores tensors as raw bytes under `<archive>/data/<key>` and the
object tree as a pickle (`<archive>/data.pkl`). Plain pickle would execute whatever the
file names, so this module unpickles with an allow-list: tensors, ordered dicts, and
(for TorchScript archives such as OpenAI's `ViT-B-32.pt`) `__torch__.*` module objects,
which become inert attribute bags. Anything else is refused. No torch import is needed,
so `clip.load("ViT-B-32.pt")` works in a JAX-only environment.
"""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Entries that carry no weights and are not needed to rebuild a state dict.
_IGNORED_PICKLES = ("constants.pkl", "traced_inputs.pkl")


class _TorchScriptObject:
    """An inert stand-in for a pickled TorchScript module: just its attributes."""

    def __init__(self, *args):
        del args
        self.attributes = {}

    def __setstate__(self, state):
        self.attributes = dict(state) if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    del unused
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=tuple(size),
        strides=tuple(s * itemsize for s in stride),
    ).copy()


def _rebuild_parameter(data, *unused):
    del unused
    return data


class _Unpickler(pickle.Unpickler):
    """Unpickler that only builds tensors, containers and inert TorchScript objects."""

    def __init__(self, file, *, archive, prefix, path):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("__torch__"):
            return _TorchScriptObject
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to load '{module}.{name}': only tensors and "
            "module state are read from PyTorch checkpoints"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _, numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            array = np.frombuffer(raw, dtype=storage_type.dtype)
            if array.size < numel:
                raise ValueError(f"{self._path}: storage {key} is truncated")
            self._storages[key] = array
        return self._storages[key]


def _flatten_module(obj, prefix, out):
    for name, value in obj.attributes.items():
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif isinstance(value, _TorchScriptObject):
            _flatten_module(value, f"{prefix}{name}.", out)


def read_state_dict(path):
    """Reads a PyTorch zip checkpoint into `{name: np.ndarray}`.

    Args:
      path: a `torch.save` state dict (possibly nested under "state_dict", as training
        checkpoints are) or a TorchScript archive (`torch.jit.save`, as OpenAI ships CLIP).

    Returns:
      A flat dict from parameter name to a numpy array in the stored dtype.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a PyTorch zip checkpoint (legacy non-zip torch.save files are not "
            "supported; re-save it with a recent torch.save)"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [
            n for n in archive.namelist()
            if n.endswith("data.pkl") and not n.endswith(_IGNORED_PICKLES)
        ]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            try:
                root = _Unpickler(f, archive=archive, prefix=prefix, path=path).load()
            except (EOFError, zipfile.BadZipFile) as e:
                raise ValueError(f"{path}: corrupted checkpoint ({e})") from e
    if isinstance(root, _TorchScriptObject):
        state = {}
        _flatten_module(root, "", state)
        return state
    if isinstance(root, dict) and isinstance(root.get("state_dict"), dict):
        root = root["state_dict"]
    if not isinstance(root, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(root).__name__}")
    state = {k: v for k, v in root.items() if isinstance(v, np.ndarray)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
