"""The torch-free PyTorch reader against damaged and hostile files, and TorchScript archives.

Every damaged or crafted file must either load exactly what was saved or raise a
ReadError (a ValueError) naming the file: never a crash, never bytes from outside the
file's storages. TorchScript archives of an open_clip model, scripted and traced, must
give the module's `state_dict()` exactly and open_clip's features.
"""

import collections
import io
import os
import pickle
import random
import re
import struct
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import torch

from p4q_jax import clip
from p4q_jax.clip import torch_reader

ATOL = 1e-4
SIX = np.arange(1, 7, dtype=np.float32)  # the bytes of storage "0" in the crafted files


# ---- hand-built archives: torch's zip layout around a pickle written by this test ----

class _Pid:
    """Pickles as the persistent id `pid`, as torch.save writes a storage."""

    def __init__(self, pid):
        self.pid = pid


class _Call:
    """Pickles as `fn(*args)`, as torch.save writes a tensor (`_rebuild_tensor_v2`)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


def _pickle(obj):
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _pid(key="0", numel=6, storage_type=torch.FloatStorage):
    return ("storage", storage_type, key, "cpu", numel)


def _tensor(pid, offset, size, stride):
    return _Call(torch._utils._rebuild_tensor_v2, _Pid(pid), offset, size, stride, False,
                 collections.OrderedDict())


def _archive(path, pkl, storages=None, *, byteorder=b"little", compression=zipfile.ZIP_STORED):
    """Writes torch's zip layout: `archive/data.pkl` + `archive/data/<key>` (+ version)."""
    storages = {"0": SIX.tobytes()} if storages is None else storages
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/version", "3\n")
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        z.writestr("archive/data.pkl", pkl)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def _raises_naming(path, pattern=""):
    """Expects a ReadError whose message names `path` and then matches `pattern`."""
    return pytest.raises(torch_reader.ReadError, match=re.escape(str(path)) + ".*" + pattern)


def test_hand_built_archive_reads_as_torch_load_does(tmp_path):
    path = _archive(tmp_path / "ok.pt", _pickle(collections.OrderedDict(
        w=_tensor(_pid(), 1, (2, 2), (1, 2)),
        legacy=_Call(torch._utils._rebuild_tensor, _Pid(_pid()), 4, (2,), (1,)))))
    expected = torch.load(path, weights_only=True)  # independent reference
    state = torch_reader.read_state_dict(path)
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    np.testing.assert_array_equal(state["w"], [[2, 4], [3, 5]])


# (case id, offset, size, stride, message) for views of the 6-element storage "0".
BAD_VIEWS = [
    ("size_past_end", 0, (7,), (1,), r"tensor on storage '0' .*does not fit in the storage's 6"),
    ("small_overrun", 5, (2,), (1,), "does not fit in the storage's 6 elements"),
    ("stride_past_end", 0, (2, 2), (1, 5), "does not fit"),
    ("empty_offset_past_end", 7, (0,), (1,), "does not fit"),
    ("huge_size", 0, (2**62,), (1,), "does not fit"),
    ("size_beyond_int64", 0, (2**64 + 1,), (1,), "does not fit"),
    ("huge_stride", 0, (2,), (2**70,), "does not fit"),
    ("negative_offset", -1, (2,), (1,), r"storage offset -1 is not an int >= 0"),
    ("bool_offset", True, (2,), (1,), "storage offset True is not an int"),
    ("float_offset", 1.0, (2,), (1,), "storage offset 1.0 is not an int"),
    ("negative_size", 0, (-1,), (1,), r"size \(-1,\) is not a sequence"),
    ("negative_stride", 0, (2,), (-1,), r"stride \(-1,\) is not a sequence"),
    ("size_not_a_sequence", 0, 6, (1,), "size 6 is not a sequence"),
    ("bool_in_size", 0, (True,), (1,), r"size \(True,\) is not a sequence"),
    ("65_dims", 0, (1,) * 65, (1,) * 65, "at most 64 ints"),
    ("lengths_differ", 0, (2, 3), (1,), "differ in length"),
    ("broadcast_beyond_file", 0, (10**9,), (0,), r"the tensors would take .*'w' with shape"),
    ("huge_empty_shape", 0, (0, 2**62), (1, 1), "the tensors would take"),
]


@pytest.mark.parametrize("offset,size,stride,message", [c[1:] for c in BAD_VIEWS],
                         ids=[c[0] for c in BAD_VIEWS])
def test_views_outside_their_storage_are_refused(tmp_path, offset, size, stride, message):
    path = _archive(tmp_path / "view.pt", _pickle({"w": _tensor(_pid(), offset, size, stride)}))
    with _raises_naming(path, message):
        torch_reader.read_state_dict(path)


# (case id, persistent id, message) for a tensor of storage "0" holding 24 bytes.
BAD_PIDS = [
    ("numel_past_data", _pid(numel=7), "storage '0' .*holds 24 bytes, but the pickle declares "
                                       "7 FloatStorage elements"),
    ("huge_numel", _pid(numel=2**70), "holds 24 bytes"),
    ("negative_numel", _pid(numel=-1), "unsupported persistent id"),
    ("bool_numel", _pid(numel=True), "unsupported persistent id"),
    ("missing_key", _pid(key="9"), "storage '9': archive/data/9 is missing from the archive"),
    ("int_key", _pid(key=0), "unsupported persistent id"),
    ("short_tuple", ("storage", torch.FloatStorage, "0"), "unsupported persistent id"),
    ("type_as_string", ("storage", "FloatStorage", "0", "cpu", 6), "unsupported persistent id"),
    ("not_a_tuple", "storage", "unsupported persistent id 'storage'"),
    ("other_storage_type", _pid(storage_type=torch.ComplexFloatStorage),
     "storage type 'ComplexFloatStorage' is not supported"),
]


@pytest.mark.parametrize("pid,message", [c[1:] for c in BAD_PIDS], ids=[c[0] for c in BAD_PIDS])
def test_bad_storage_references_are_refused(tmp_path, pid, message):
    path = _archive(tmp_path / "pid.pt", _pickle({"w": _tensor(pid, 0, (2,), (1,))}))
    with _raises_naming(path, message):
        torch_reader.read_state_dict(path)


def test_storage_bytes_must_match_the_declared_elements(tmp_path):
    path = _archive(tmp_path / "odd.pt", _pickle({"w": _tensor(_pid(), 0, (2,), (1,))}),
                    {"0": SIX.tobytes() + b"\x00"})
    with _raises_naming(path, "storage '0' .*holds 25 bytes, but the pickle declares 6"):
        torch_reader.read_state_dict(path)


def test_a_storage_declared_twice_differently_is_refused(tmp_path):
    path = _archive(tmp_path / "twice.pt", _pickle({"a": _tensor(_pid(), 0, (2,), (1,)),
                                                    "b": _tensor(_pid(numel=5), 0, (2,), (1,))}))
    with _raises_naming(path, "storage '0' is declared twice"):
        torch_reader.read_state_dict(path)


def test_disallowed_globals_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for i, obj in enumerate([_Call(os.system, f"touch {marker}"),
                             _Call(eval, f"open({str(marker)!r}, 'w')"),
                             _Call(getattr, "", "join"),
                             _Call(torch._utils._rebuild_qtensor),
                             np.zeros(3)]):
        path = _archive(tmp_path / f"evil{i}.pt", _pickle({"w": obj}))
        with _raises_naming(path, "refusing to load '"):
            torch_reader.read_state_dict(path)
    assert not marker.exists()


RAW_PICKLES = [
    ("huge_memo_index", b"\x80\x02}" + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 16) + b".",
     "memo index 4294967280"),
    ("huge_bytes8", b"\x80\x04" + pickle.BINBYTES8 + struct.pack("<Q", 2**62) + b".",
     "data.pkl is not a valid pickle"),
    ("unknown_opcode", b"\x80\x02\xff.", "data.pkl is not a valid pickle"),
    ("no_stop", b"\x80\x02}", "data.pkl is not a valid pickle"),
    ("text_persistent_id", b"\x80\x02Pfoo\n.", "unsupported persistent id 'foo'"),
    ("calls_a_storage_type", _pickle(_Call(torch.FloatStorage, 3)), "corrupted or unsupported"),
    ("tensor_without_storage", _pickle({"w": _Call(torch._utils._rebuild_tensor_v2, "x", 0, (1,),
                                                   (1,), False, {})}),
     "a tensor's storage must come from the archive, found str"),
    ("root_is_a_list", _pickle([1, 2]), "expected a state dict, found list"),
    ("int_keys", _pickle({1: _tensor(_pid(), 0, (2,), (1,))}), "state dict keys must be strings"),
]


@pytest.mark.parametrize("pkl,message", [c[1:] for c in RAW_PICKLES],
                         ids=[c[0] for c in RAW_PICKLES])
def test_malformed_pickles_are_refused(tmp_path, pkl, message):
    path = _archive(tmp_path / "raw.pt", pkl)
    with _raises_naming(path, message):
        torch_reader.read_state_dict(path)


def test_big_endian_archive_is_refused(tmp_path):
    path = _archive(tmp_path / "be.pt", _pickle({"w": _tensor(_pid(), 0, (2,), (1,))}),
                    byteorder=b"big")
    with _raises_naming(path, "byte order b'big' is not supported"):
        torch_reader.read_state_dict(path)


def test_compressed_storage_larger_than_the_file_is_refused(tmp_path):
    zeros = bytes(4 * 10**6)  # deflates ~1000:1: a small file declaring 4 MB
    path = _archive(tmp_path / "bomb.pt", _pickle({"w": _tensor(_pid(numel=10**6), 0, (2,), (1,))}),
                    {"0": zeros}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 10**5
    with _raises_naming(path, "storage '0': archive/data/0 declares 4000000 bytes"):
        torch_reader.read_state_dict(path)


def test_bool_storage_reads_any_nonzero_byte_as_true(tmp_path):
    path = _archive(tmp_path / "bool.pt",
                    _pickle({"b": _tensor(_pid(numel=3, storage_type=torch.BoolStorage), 0, (3,),
                                          (1,))}),
                    {"0": bytes([0, 1, 7])})
    np.testing.assert_array_equal(torch_reader.read_state_dict(path)["b"], [False, True, True])


def test_torchscript_module_cycles_are_read_once(tmp_path, monkeypatch):
    torchscript = types.ModuleType("__torch__")

    class Module:
        """Pickles as a TorchScript module does: a `__torch__` class and a state dict."""

        def __init__(self):
            self.state = {}

        def __reduce__(self):
            return Module, (), self.state

    Module.__module__, Module.__qualname__ = "__torch__", "Module"
    torchscript.Module = Module
    monkeypatch.setitem(sys.modules, "__torch__", torchscript)
    root, child = Module(), Module()
    root.state = {"w": _tensor(_pid(), 0, (2,), (1,)), "me": root, "child": child}
    child.state = {"b": _tensor(_pid(), 2, (3,), (1,)), "parent": root, "again": child}
    path = _archive(tmp_path / "cycle.pt", _pickle(root))
    state = torch_reader.read_state_dict(path)
    assert sorted(state) == ["child.b", "w"]
    np.testing.assert_array_equal(state["child.b"], [3, 4, 5])


def test_flipped_tensor_byte_fails_the_crc_check(tmp_path):
    """torch stores entries uncompressed; zipfile's CRC-32 check still catches any flip."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if re.fullmatch(r"[^/]+/data/0", i.filename))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                    info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with _raises_naming(path, "Bad CRC-32"):
        torch_reader.read_state_dict(path)


# ---- the fuzz: many damaged copies of one small torch.save file ----

def _small_state_dict():
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=gen),
        "t": torch.randn(3, 5, generator=gen).t(),  # a strided view of a whole storage
        "h": torch.randn(6, generator=gen).half(),
        "i": torch.arange(5) * 7919,
        "b": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5),
    }


def _storage_chunks(data):
    """Each itemsize -> every aligned element's bytes in the file's storages (read by zipfile)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        raws = [z.read(n) for n in z.namelist() if re.fullmatch(r"[^/]+/data/\d+", n)]
    return {size: {raw[i:i + size] for raw in raws for i in range(0, len(raw) - size + 1, size)}
            for size in (1, 2, 4, 8)}


def _rezip(data, pkl):
    """The same archive with `data.pkl` replaced (valid CRCs: only the pickle is damaged)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def _load_or_named_error(path):
    """The state dict, or None after a ReadError naming `path`; anything else fails the test."""
    try:
        return torch_reader.read_state_dict(path)
    except torch_reader.ReadError as e:
        assert str(path) in str(e), e
        return None


def test_fuzz_damaged_files_load_exactly_or_fail_clearly(tmp_path):
    expected = {k: v.numpy() for k, v in _small_state_dict().items()}
    buf = io.BytesIO()
    torch.save(_small_state_dict(), buf)
    data = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    chunks = _storage_chunks(data)
    rng = random.Random(0)
    # (mutated file, whether a load must reproduce `expected` exactly)
    cases = [(data[:n], True) for n in sorted(rng.sample(range(len(data)), 300))]
    cases += [(data[:-n], True) for n in range(1, 51)]  # the central directory, byte by byte
    for _ in range(600):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        cases.append((bytes(flipped), True))
    for _ in range(400):
        flipped = bytearray(pkl)
        flipped[rng.randrange(len(pkl))] ^= rng.randrange(1, 256)
        cases.append((_rezip(data, bytes(flipped)), False))
    cases += [(_rezip(data, pkl[:n]), False) for n in rng.sample(range(len(pkl)), 100)]

    outcomes = collections.Counter()
    start = time.perf_counter()
    for i, (mutated, must_match) in enumerate(cases):
        path = tmp_path / f"case{i}.pt"
        path.write_bytes(mutated)
        state = _load_or_named_error(path)
        if state is None:
            outcomes["error"] += 1
        elif must_match:
            assert state.keys() == expected.keys(), i
            for k, v in expected.items():
                assert state[k].dtype == v.dtype, (i, k)
                np.testing.assert_array_equal(state[k], v, err_msg=f"case {i}: {k}")
            outcomes["exact"] += 1
        else:  # a damaged pickle may describe other views, but only of the file's storages
            for k, v in state.items():
                if v.dtype != np.bool_:
                    elements = np.ascontiguousarray(v).view(np.uint8).reshape(-1, v.itemsize)
                    assert all(e.tobytes() in chunks[v.itemsize] for e in elements), (i, k)
            outcomes["other_views"] += 1
    elapsed = time.perf_counter() - start
    print(f"{len(cases)} damaged files in {elapsed:.1f} s: {dict(outcomes)}")
    assert len(cases) >= 500 and elapsed < 60
    assert min(outcomes["error"], outcomes["exact"], outcomes["other_views"]) > 0


# Storage types with the numpy dtype of their elements, for the crafted-view fuzz.
STORAGES = [(torch.FloatStorage, np.float32), (torch.HalfStorage, np.float16),
            (torch.LongStorage, np.int64), (torch.ByteStorage, np.uint8),
            (torch.BoolStorage, np.uint8)]
ODD_VALUES = [-1, 2**31, 2**63 - 1, 2**64, True, 1.5, None]


def test_fuzz_crafted_views_match_an_element_by_element_gather(tmp_path):
    """Random offsets, sizes, strides, element counts and storage lengths in a hand-built
    pickle: a load must equal the elements gathered one by one, else a named error."""
    rng = random.Random(1)

    def field():  # mostly small valid values, so that both outcomes are common
        return rng.choice(ODD_VALUES) if rng.random() < 0.1 else rng.randrange(5)

    outcomes = collections.Counter()
    start = time.perf_counter()
    for i in range(500):
        storage_type, dtype = rng.choice(STORAGES)
        numel = rng.randrange(17)
        raw = bytes(rng.randrange(256) for _ in range(numel * np.dtype(dtype).itemsize
                                                      + rng.choice([0, 0, 0, 1, -1])))
        ndim = rng.randrange(4)
        size = tuple(field() for _ in range(ndim))
        stride = tuple(field() for _ in range(ndim))
        offset = field()
        if rng.random() < 0.1:
            numel = field()
        pkl = _pickle({"w": _tensor(("storage", storage_type, "0", "cpu", numel), offset, size,
                                    stride)})
        path = _archive(tmp_path / f"view{i}.pt", pkl, {"0": raw})
        state = _load_or_named_error(path)
        if state is None:
            outcomes["error"] += 1
            continue
        storage = np.frombuffer(raw, dtype)
        if storage_type is torch.BoolStorage:
            storage = storage != 0
        out = state["w"]
        assert out.shape == size and out.dtype == storage.dtype, i
        for idx in np.ndindex(*size):
            element = storage[offset + sum(j * s for j, s in zip(idx, stride))]
            assert out[idx].tobytes() == element.tobytes(), (i, idx)  # bytes: NaNs compare too
        outcomes["loaded"] += 1
    elapsed = time.perf_counter() - start
    print(f"500 crafted views in {elapsed:.1f} s: {dict(outcomes)}")
    assert elapsed < 60 and min(outcomes["error"], outcomes["loaded"]) > 50


# ---- TorchScript archives of a small open_clip model ----

@pytest.fixture(scope="module")
def tiny_open_clip():
    """A random-weight open_clip CLIP of the `tiny` config, its features on fixed inputs."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    config = clip.get_config("tiny")
    v, t = config.vision, config.text
    model = open_clip.model.CLIP(
        embed_dim=config.embed_dim,
        vision_cfg=dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                        layers=v.layers, head_width=v.width // v.heads),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                      heads=t.heads, layers=t.layers),
        quick_gelu=True).eval()
    with torch.no_grad():  # LayerNorms start as identity and biases at zero: perturb them
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, v.image_size, v.image_size, 3)).astype(np.float32)
    tokens = clip.tokenize(["a photo of a cat.", "a blurry photo of the big red truck!"])
    torch_inputs = (torch.from_numpy(images).permute(0, 3, 1, 2),
                    torch.from_numpy(np.asarray(tokens)).long())
    with torch.no_grad():
        refs = (model.encode_image(torch_inputs[0]).numpy(),
                model.encode_text(torch_inputs[1]).numpy())
    return model, torch_inputs, refs, (images, tokens)


def _normalize(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("export", ["script", "trace"])
def test_torchscript_archive_loads_the_module_parameters(tmp_path, tiny_open_clip, export):
    model_pt, torch_inputs, (ref_image, ref_text), (images, tokens) = tiny_open_clip
    with torch.no_grad():
        exported = (torch.jit.script(model_pt) if export == "script"
                    else torch.jit.trace(model_pt, torch_inputs, check_trace=False))
    path = tmp_path / f"tiny_{export}.pt"
    torch.jit.save(exported, path)

    state = torch_reader.read_state_dict(path)
    expected = model_pt.state_dict()
    # TorchScript also keeps open_clip's non-persistent causal-mask buffer.
    assert set(state) - set(expected) == {"attn_mask"}
    for k, value in expected.items():
        np.testing.assert_array_equal(state[k], value.numpy(), err_msg=k)

    model, params = clip.load(path)
    assert model.config == clip.get_config("tiny")
    img = clip.encode_image(model, params, images)
    txt = clip.encode_text(model, params, tokens)
    np.testing.assert_allclose(_normalize(img), _normalize(ref_image), atol=ATOL, rtol=0)
    np.testing.assert_allclose(_normalize(txt), _normalize(ref_text), atol=ATOL, rtol=0)
