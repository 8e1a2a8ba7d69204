"""Parity of this project's CLIP with the reference implementations (float32, CPU).

Checkpoints are written by the tests in the real formats: Hugging Face `CLIPModel`s with
random weights (`save_pretrained`, safetensors and torch .bin), and an open_clip ViT-B/32
with random weights saved as a plain state dict and as a TorchScript archive.
"""

import numpy as np
import pytest
import torch

from p4q_jax import clip

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _normalize(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(image_size, *, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    tokens = clip.tokenize(["a photo of a cat.", "a blurry photo of the big red truck!"][:batch])
    return images, tokens


def _assert_features_match(model, params, ref_image, ref_text, images, tokens):
    img = clip.encode_image(model, params, images)
    txt = clip.encode_text(model, params, tokens)
    np.testing.assert_allclose(_normalize(img), _normalize(ref_image), atol=ATOL, rtol=0)
    np.testing.assert_allclose(_normalize(txt), _normalize(ref_text), atol=ATOL, rtol=0)


def _hf_model(*, small):
    if small:
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4)
        vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, image_size=64, patch_size=16)
        config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                         projection_dim=48)
    else:  # ViT-B/32's shapes
        config = transformers.CLIPConfig(projection_dim=512)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    # HF initialises LayerNorms to identity and biases to zero; perturb them so the test
    # checks that every tensor is mapped.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_reference(model, images, tokens):
    with torch.no_grad():
        pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2)
        image = model.get_image_features(pixel_values=pixel_values)
        text = model.get_text_features(input_ids=torch.from_numpy(np.asarray(tokens)).long())
    as_np = lambda out: getattr(out, "pooler_output", out).numpy()
    return as_np(image), as_np(text)


@pytest.mark.parametrize("small", [True, False], ids=["small", "vit_b32"])
def test_huggingface_safetensors(tmp_path, small):
    hf = _hf_model(small=small)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model, params = clip.load(tmp_path)
    images, tokens = _inputs(model.config.vision.image_size)
    _assert_features_match(model, params, *_hf_reference(hf, images, tokens), images, tokens)


def test_huggingface_pytorch_bin(tmp_path):
    hf = _hf_model(small=True)
    hf.save_pretrained(tmp_path, safe_serialization=False)
    if not (tmp_path / "pytorch_model.bin").exists():  # newer transformers always write safetensors
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    model, params = clip.load(tmp_path)
    images, tokens = _inputs(model.config.vision.image_size)
    _assert_features_match(model, params, *_hf_reference(hf, images, tokens), images, tokens)


@pytest.fixture(scope="module")
def open_clip_vitb32():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    images, tokens = _inputs(224)
    with torch.no_grad():
        ref_image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_text = model.encode_text(torch.from_numpy(np.asarray(tokens)).long()).numpy()
    return model, (ref_image, ref_text), (images, tokens)


def test_open_clip_state_dict(tmp_path, open_clip_vitb32):
    model_pt, refs, inputs = open_clip_vitb32
    torch.save(model_pt.state_dict(), tmp_path / "ViT-B-32.pt")
    model, params = clip.load(tmp_path / "ViT-B-32.pt")
    assert model.config == clip.get_config("ViT-B/32")
    _assert_features_match(model, params, *refs, *inputs)


def test_open_clip_torchscript_archive(tmp_path, open_clip_vitb32):
    model_pt, refs, inputs = open_clip_vitb32
    images, tokens = inputs
    with torch.no_grad():
        traced = torch.jit.trace(
            model_pt, (torch.from_numpy(images).permute(0, 3, 1, 2),
                       torch.from_numpy(np.asarray(tokens)).long()), check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT-B-32.pt")
    model, params = clip.load(tmp_path / "ViT-B-32.pt")
    _assert_features_match(model, params, *refs, *inputs)


def test_orbax_round_trip_is_exact(tmp_path):
    model, params = clip.init("tiny", seed=3)
    clip.save(tmp_path / "orbax", model.config, params)
    model2, params2 = clip.load(tmp_path / "orbax")
    assert model2.config == model.config
    for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(t)) for t in (params, params2))):
        np.testing.assert_array_equal(a, b)
