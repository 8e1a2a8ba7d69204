"""Checkpoint loading errors and the converter CLI."""

import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch

from p4q_jax import clip
from p4q_jax.clip import checkpoints
from p4q_jax.clip import configs

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = configs.get_config("tiny")


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
    with pytest.raises(pickle.UnpicklingError, match=r"evil.pt: refusing to load '(__builtin__|builtins).print'"):
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
    assert checkpoints.bytes_on_disk(tmp_path) == 43
    assert checkpoints.bytes_on_disk(tmp_path / "top") == 3
