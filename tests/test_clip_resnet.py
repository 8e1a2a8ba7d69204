"""CLIP's ModifiedResNet image towers (RN50 family): parity with open_clip, loading, errors.

The references are open_clip `CLIP` models with random weights (`pretrained=None`) whose
BatchNorm affines and running statistics are randomized too (open_clip starts every
`bn3` at zero, which would hide most of each block), saved as a plain state dict and as a
TorchScript archive. A small config with every structural element (strided stages, projected
shortcuts, a 2x2 attention pool) keeps most tests fast; RN50 and RN101 run once each.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from p4q_jax import clip
from p4q_jax.clip import storage
from p4q_jax.clip import architectures
from p4q_jax.clip import model as model_lib

open_clip = pytest.importorskip("open_clip")

ATOL = 1e-4
SMALL = architectures.get_config("tiny-rn")


def _randomize(model):
    """Non-trivial BatchNorm (affine and statistics) and biases, seeded."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        for name, p in model.named_parameters():
            if "ln" in name or (name.endswith("bias") and "bn" not in name):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _open_clip_model(config):
    torch.manual_seed(0)
    v, t = config.vision, config.text
    model = open_clip.model.CLIP(
        embed_dim=config.embed_dim,
        vision_cfg=dict(image_size=v.image_size, layers=v.layers, width=v.width),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                      heads=t.heads, layers=t.layers),
        quick_gelu=True)
    return _randomize(model.eval())


def _references(model, image_size, batch=2):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    tokens = clip.tokenize(["a photo of a cat.", "a blurry photo of the big red truck!"][:batch])
    torch_inputs = (torch.from_numpy(images).permute(0, 3, 1, 2),
                    torch.from_numpy(np.asarray(tokens)).long())
    with torch.no_grad():
        refs = (model.encode_image(torch_inputs[0]).numpy(),
                model.encode_text(torch_inputs[1]).numpy())
    return torch_inputs, refs, (images, tokens)


def _normalize(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _max_error(model, params, refs, inputs):
    images, tokens = inputs
    img = clip.encode_image(model, params, images)
    txt = clip.encode_text(model, params, tokens)
    return (float(np.abs(_normalize(img) - _normalize(refs[0])).max()),
            float(np.abs(_normalize(txt) - _normalize(refs[1])).max()))


@pytest.fixture(scope="module")
def small_open_clip():
    model = _open_clip_model(SMALL)
    return (model, *_references(model, SMALL.vision.image_size))


@pytest.mark.parametrize("export", ["state_dict", "trace", "script"])
def test_small_resnet_matches_open_clip(tmp_path, small_open_clip, export):
    model_pt, torch_inputs, refs, inputs = small_open_clip
    path = tmp_path / "rn.pt"
    if export == "state_dict":
        torch.save(model_pt.state_dict(), path)
    else:
        with torch.no_grad():
            exported = (torch.jit.script(model_pt) if export == "script"
                        else torch.jit.trace(model_pt, torch_inputs, check_trace=False))
        torch.jit.save(exported, path)
    model, params = clip.load(path)
    assert model.config == SMALL
    assert max(_max_error(model, params, refs, inputs)) < ATOL


def _strided_pool(x, stride):
    """torchvision's shortcut, for contrast: subsample (a strided 1x1 conv), no averaging."""
    return x[:, ::stride, ::stride] if stride > 1 else x


def test_the_parity_check_catches_a_wrong_detail(tmp_path, small_open_clip, monkeypatch):
    """Without the anti-aliasing average pools the features move far beyond the tolerance."""
    model_pt, _, refs, inputs = small_open_clip
    torch.save(model_pt.state_dict(), tmp_path / "rn.pt")
    model, params = clip.load(tmp_path / "rn.pt")
    images = jnp.asarray(inputs[0])
    right = model.apply({"params": params}, images, method=model.encode_image)
    assert np.abs(_normalize(right) - _normalize(refs[0])).max() < ATOL
    monkeypatch.setattr(model_lib, "_avg_pool", _strided_pool)  # un-jitted apply: retraced
    wrong = model.apply({"params": params}, images, method=model.encode_image)
    assert np.abs(_normalize(wrong) - _normalize(refs[0])).max() > 10 * ATOL  # 89x measured


@pytest.mark.parametrize("name", ["RN50", "RN101"])
def test_released_architectures_match_open_clip(tmp_path, name):
    model_pt = _randomize(open_clip.create_model(name, pretrained=None,
                                                 force_quick_gelu=True).eval())
    _, refs, inputs = _references(model_pt, 224, batch=1)
    torch.save(model_pt.state_dict(), tmp_path / f"{name}.pt")
    model, params = clip.load(tmp_path / f"{name}.pt")
    assert model.config == clip.get_config(name)
    assert max(_max_error(model, params, refs, inputs)) < ATOL


@pytest.mark.parametrize("name", ["RN50x4", "RN50x16", "RN50x64"])
def test_named_configs_infer_back_from_open_clip_shapes(name):
    """Each named config's shapes equal open_clip's (no forward: shapes only, from meta)."""
    with torch.device("meta"):
        model_pt = open_clip.model.CLIP(**open_clip.get_model_config(name))
    state = {k: np.empty(v.shape, np.float32) if v.ndim else np.float32(0)
             for k, v in model_pt.state_dict().items()}
    config = storage.infer_openai_config(state)
    assert config == clip.get_config(name)


def _small_state_dict(small_open_clip):
    return {k: v.clone() for k, v in small_open_clip[0].state_dict().items()}


def test_missing_unexpected_and_misshapen_resnet_keys_are_named(tmp_path, small_open_clip):
    state = _small_state_dict(small_open_clip)
    del state["visual.layer2.0.downsample.1.running_var"], state["visual.attnpool.c_proj.bias"]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(clip.CheckpointError, match=r"m.pt: missing keys \['visual.attnpool."
                       r"c_proj.bias', 'visual.layer2.0.downsample.1.running_var'\]"):
        clip.load(tmp_path / "m.pt")
    state = _small_state_dict(small_open_clip) | {"visual.layer1.0.se.weight": torch.zeros(2)}
    torch.save(state, tmp_path / "u.pt")
    with pytest.raises(clip.CheckpointError, match=r"unexpected keys \['visual.layer1.0.se."):
        clip.load(tmp_path / "u.pt")
    state = _small_state_dict(small_open_clip)
    state["visual.layer3.0.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(clip.CheckpointError, match=r"s.pt.*shape mismatch.*layer3_0'\]\['conv2'"
                       r"\]\['kernel'\]: expected \(3, 3, 32, 32\), found \(1, 1, 32, 32\)"):
        clip.load(tmp_path / "s.pt")


def test_orbax_round_trip_and_convert_cli(tmp_path, small_open_clip):
    torch.save(small_open_clip[0].state_dict(), tmp_path / "rn.pt")
    done = subprocess.run([sys.executable, "-m", "p4q_jax.clip.convert", str(tmp_path / "rn.pt"),
                           str(tmp_path / "orbax")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model, params = clip.load(tmp_path / "rn.pt")
    model2, params2 = clip.load(tmp_path / "orbax")
    assert model2.config == model.config and model.config.vision.layers == (1, 2, 1, 1)
    flat, flat2 = (dict(jax.tree_util.tree_leaves_with_path(p)) for p in (params, params2))
    assert flat.keys() == flat2.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat2[key]), np.asarray(value), err_msg=str(key))


def test_init_builds_a_resnet_with_batch_norm_statistics():
    model, params = clip.init("tiny-rn", seed=0)
    assert model.config.vision.is_resnet
    stats = params["visual"]["layer2_0"]["downsample_1"]
    assert set(stats) == {"scale", "bias", "mean", "var"}
    features = clip.encode_image(model, params, np.zeros((1, 64, 64, 3), np.float32))
    assert features.shape == (1, 64) and np.isfinite(features).all()


def test_a_resnet_config_survives_json():
    config = architectures.get_config("RN50x4")
    assert architectures.CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="multiple of 32"):
        architectures.resnet(embed_dim=8, image_size=100, layers=(1, 1, 1, 1), vision_width=8,
                       text_width=64)
