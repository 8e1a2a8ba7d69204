"""Checkpoint loading errors and the converter CLI."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from p4q_jax import clip
from p4q_jax.clip import storage
from p4q_jax.clip import architectures

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = architectures.get_config("tiny")


def _tiny_openai_state_dict():
    """A random OpenAI-layout state dict of the tiny config, built independently of our code."""
    rng = np.random.default_rng(0)
    v, t, e = TINY.vision, TINY.text, TINY.embed_dim
    sd = {
        "visual.conv1.weight": (v.width, 3, v.patch_size, v.patch_size),
        "visual.class_embedding": (v.width,),
        "visual.positional_embedding": (v.num_positions, v.width),
        "visual.proj": (v.width, e),
        "token_embedding.weight": (t.vocab_size, t.width),
        "positional_embedding": (t.context_length, t.width),
        "text_projection": (t.width, e),
        "logit_scale": (),
    }
    for ln, w in (("visual.ln_pre", v.width), ("visual.ln_post", v.width), ("ln_final", t.width)):
        sd |= {f"{ln}.weight": (w,), f"{ln}.bias": (w,)}
    for prefix, tower in (("visual.transformer.", v), ("transformer.", t)):
        w = tower.width
        for i in range(tower.layers):
            p = f"{prefix}resblocks.{i}."
            sd |= {p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                   p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                   p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                   p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                   p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                   p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,)}
    return {k: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for k, s in sd.items()}


def _save(sd, path):
    torch.save(sd, path)
    return path


def test_tiny_state_dict_loads_with_inferred_config(tmp_path):
    model, _ = clip.load(_save(_tiny_openai_state_dict(), tmp_path / "tiny.pt"))
    assert model.config == TINY


def test_half_precision_weights_load_as_float32(tmp_path):
    sd = {k: v.half() for k, v in _tiny_openai_state_dict().items()}
    _, params = clip.load(_save(sd, tmp_path / "tiny_fp16.pt"))
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        clip.load(tmp_path / "nope.pt")


def test_unknown_file_format(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(clip.CheckpointError, match=r"weights.npz.*unknown checkpoint format"):
        clip.load(tmp_path / "weights.npz")


def test_unknown_directory_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(clip.CheckpointError, match="unknown checkpoint layout"):
        clip.load(tmp_path)


def test_not_a_torch_zip(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"bad.pt.*not a PyTorch zip"):
        clip.load(tmp_path / "bad.pt")


def test_truncated_file(tmp_path):
    path = _save(_tiny_openai_state_dict(), tmp_path / "full.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt"):
        clip.load(tmp_path / "cut.pt")


def test_missing_keys_are_listed(tmp_path):
    sd = _tiny_openai_state_dict()
    del sd["transformer.resblocks.1.mlp.c_fc.bias"], sd["visual.ln_post.weight"]
    with pytest.raises(clip.CheckpointError, match=r"missing keys.*transformer.resblocks.1.mlp"
                       r".c_fc.bias.*visual.ln_post.weight"):
        clip.load(_save(sd, tmp_path / "m.pt"))


def test_unexpected_keys_are_listed(tmp_path):
    sd = _tiny_openai_state_dict() | {"extra.head.weight": torch.zeros(3)}
    with pytest.raises(clip.CheckpointError, match=r"unexpected keys \['extra.head.weight'\]"):
        clip.load(_save(sd, tmp_path / "u.pt"))


def test_shape_mismatch_is_named(tmp_path):
    sd = _tiny_openai_state_dict()
    sd["transformer.resblocks.0.mlp.c_proj.weight"] = torch.zeros(64, 100)
    with pytest.raises(clip.CheckpointError, match=r"s.pt.*shape mismatch.*c_proj.*kernel"):
        clip.load(_save(sd, tmp_path / "s.pt"))


def test_refuses_arbitrary_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"logit_scale": torch.zeros(()), "x": Evil()}, path)
    with pytest.raises(clip.CheckpointError,
                       match=r"evil.pt: refusing to load '(__builtin__|builtins).print'"):
        clip.load(path)


def test_orbax_save_refuses_to_overwrite(tmp_path):
    model, params = clip.init("tiny")
    clip.save(tmp_path / "ckpt", model.config, params)
    with pytest.raises(FileExistsError, match="ckpt"):
        clip.save(tmp_path / "ckpt", model.config, params)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_convert_cli_writes_orbax_with_same_params(tmp_path):
    src = _save(_tiny_openai_state_dict(), tmp_path / "tiny.pt")
    dst = tmp_path / "tiny_orbax"
    subprocess.run([sys.executable, "-m", "p4q_jax.clip.convert", str(src), str(dst)],
                   check=True, cwd=REPO, capture_output=True)
    _, p1 = clip.load(src)
    _, p2 = clip.load(dst)
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zip_without_data_pickle(tmp_path):
    with zipfile.ZipFile(tmp_path / "empty.pt", "w") as z:
        z.writestr("archive/readme", "nothing")
    with pytest.raises(ValueError, match="expected one data.pkl"):
        clip.load(tmp_path / "empty.pt")


def test_bytes_on_disk_counts_files_at_any_depth(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "top").write_bytes(b"x" * 3)
    (tmp_path / "a" / "b" / "deep").write_bytes(b"y" * 40)
    (tmp_path / "empty").mkdir()
    assert storage.bytes_on_disk(tmp_path) == 43
    assert storage.bytes_on_disk(tmp_path / "top") == 3


def test_state_dict_without_clip_keys_names_the_file(tmp_path):
    path = _save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(clip.CheckpointError, match=re.escape(str(path)) + r": cannot infer the "
                       r"architecture \(not an OpenAI-layout .*'visual.conv1.weight'"):
        clip.load(path)


def _hf_dir(path, *, config_text, weights):
    """A Hugging Face-layout directory holding the given config.json text and safetensors bytes."""
    path.mkdir()
    (path / "config.json").write_text(config_text)
    (path / "model.safetensors").write_bytes(weights)
    return path


def _safetensors_bytes(tmp_path):
    safetensors.numpy.save_file({"logit_scale": np.zeros((), np.float32),
                                 "text_projection.weight": np.ones((4, 4), np.float32)},
                                tmp_path / "w.safetensors")
    return (tmp_path / "w.safetensors").read_bytes()


@pytest.mark.parametrize("config_text,message", [
    ('{"text_config": {"hidden_size": 6', "not a readable JSON file"),
    ("", "not a readable JSON file"),
    ('{"text_config": 3, "vision_config": {}}', "not a valid CLIP config"),
    ('{"vision_config": {}}', "not a valid CLIP config .*text_config"),
], ids=["truncated", "empty", "wrong_type", "missing_tower"])
def test_bad_hf_config_json_is_named(tmp_path, config_text, message):
    path = _hf_dir(tmp_path / "hf", config_text=config_text, weights=_safetensors_bytes(tmp_path))
    with pytest.raises(clip.CheckpointError,
                       match=re.escape(str(path / "config.json")) + ": " + message):
        clip.load(path)


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1], ids=lambda c: f"cut{c}")
@pytest.mark.parametrize("layout", ["hf_dir", "file"])
def test_truncated_safetensors_is_named(tmp_path, layout, cut):
    weights = _safetensors_bytes(tmp_path)[:cut]
    if layout == "hf_dir":
        path = _hf_dir(tmp_path / "hf", config_text='{"text_config": {}, "vision_config": {}}',
                       weights=weights)
        named = path / "model.safetensors"
    else:
        path = named = tmp_path / "cut.safetensors"
        path.write_bytes(weights)
    with pytest.raises(clip.CheckpointError,
                       match=re.escape(str(named)) + ": not a readable safetensors file"):
        clip.load(path)


def _orbax_copy(tiny_checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


@pytest.mark.parametrize("cut", [0, 10, -5], ids=lambda c: f"cut{c}")
def test_truncated_orbax_json_is_named(tiny_checkpoint, tmp_path, cut):
    path = _orbax_copy(tiny_checkpoint, tmp_path)
    marker = path / storage.ORBAX_MARKER
    marker.write_text(marker.read_text()[:cut])
    with pytest.raises(clip.CheckpointError,
                       match=re.escape(str(marker)) + ": not a readable JSON file"):
        clip.load(path)


def test_orbax_json_without_a_config_is_named(tiny_checkpoint, tmp_path):
    path = _orbax_copy(tiny_checkpoint, tmp_path)
    (path / storage.ORBAX_MARKER).write_text('{"provenance": {}}')
    with pytest.raises(clip.CheckpointError, match=re.escape(str(path / storage.ORBAX_MARKER))
                       + r": not a valid CLIP config \(KeyError: 'config'\)"):
        clip.load(path)


@pytest.mark.parametrize("tower,field,value,message", [
    ("vision", "width", 128,
     r"\['visual'\]\['class_embedding'\]: expected \(128,\), found \(64,\)"),
    ("text", "layers", 3,
     r"\['text'\]\['transformer'\]\['resblocks_2'\]\['attn'\]\['in_proj'\]\['bias'\]: "
     r"expected \(192,\), found None"),
    ("text", "layers", 1,
     r"\['text'\]\['transformer'\]\['resblocks_1'\]\['attn'\]\['in_proj'\]\['bias'\]: "
     r"expected None, found \(192,\)"),
    ("vision", "patch_size", 16,
     r"\['visual'\]\['conv1'\]\['kernel'\]: expected \(16, 16, 3, 64\), found \(8, 8, 3, 64\)"),
], ids=["width", "more_layers", "fewer_layers", "patch"])
def test_orbax_config_that_does_not_match_the_params_is_refused(tiny_checkpoint, tmp_path, tower,
                                                                field, value, message):
    """The stored array shapes are checked against the config before anything is restored."""
    path = _orbax_copy(tiny_checkpoint, tmp_path)
    marker = path / storage.ORBAX_MARKER
    meta = json.loads(marker.read_text())
    meta["config"][tower][field] = value
    marker.write_text(json.dumps(meta))
    with pytest.raises(clip.CheckpointError, match=re.escape(str(path / "params"))
                       + r" .*shape mismatch with the architecture: .*" + message):
        clip.load(path)


def test_corrupted_orbax_metadata_is_named(tiny_checkpoint, tmp_path):
    path = _orbax_copy(tiny_checkpoint, tmp_path)
    metadata = path / "params" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(clip.CheckpointError, match=re.escape(str(path / "params"))
                       + ": no readable array metadata"):
        clip.load(path)


def test_truncated_orbax_array_file_is_named(tiny_checkpoint, tmp_path):
    path = _orbax_copy(tiny_checkpoint, tmp_path)
    data_files = [f for f in (path / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    largest = max(data_files, key=lambda f: f.stat().st_size)  # holds the token embedding
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    with pytest.raises(clip.CheckpointError, match=re.escape(str(path / "params"))
                       + ": cannot restore the arrays"):
        clip.load(path)


def test_relative_orbax_path_loads(tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tiny_checkpoint.parent)  # Orbax itself refuses relative paths
    config, params = storage.load_params(tiny_checkpoint.name)
    assert config == storage.load_params(tiny_checkpoint)[0]
    assert jax.tree.structure(params) == jax.tree.structure(
        storage.abstract_params(config))


def _with_nan_ln_final(params):
    params = jax.tree.map(np.array, params)
    params["text"]["ln_final"]["scale"][:] = np.nan
    return params


def test_orbax_checkpoint_with_non_finite_weights_names_the_tensor(tmp_path):
    """An all-NaN ln_final loaded and evaluated to chance with no warning."""
    model, params = clip.init("tiny", seed=0)
    clip.save(tmp_path / "nan", model.config, _with_nan_ln_final(params))
    with pytest.raises(clip.CheckpointError,
                       match=r"params: text/ln_final/scale holds 64 non-finite values \(NaN or "
                             r"inf\) of 64"):
        clip.load(tmp_path / "nan")
    clip.save(tmp_path / "good", model.config, params)
    clip.load(tmp_path / "good")  # finite weights load


def test_openai_file_with_an_infinite_weight_names_its_key(tmp_path):
    sd = _tiny_openai_state_dict()
    sd["transformer.resblocks.0.mlp.c_fc.bias"][3] = float("inf")
    path = _save(sd, tmp_path / "inf.pt")
    with pytest.raises(clip.CheckpointError, match=rf"{path}: transformer.resblocks.0.mlp.c_fc"
                                                   r".bias holds 1 non-finite values"):
        clip.load(path)
