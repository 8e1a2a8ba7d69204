"""Quantizing CLIP's ResNet image tower: its sites, numpy references for a kernel and the
image input, BatchNorm folding, accuracy vs bits, export, and the P4Q gradient."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import quant
from p4q_jax.quant import export
from p4q_jax.quant import fold

TEXTS = [t.format(c) for c in ("cat", "dog", "truck", "ship")
         for t in ("a photo of a {}.", "a blurry photo of the {}.")]


def _randomize_batch_norm(params, seed=0):
    """Checkpoint-like BatchNorms: scales of both signs, non-zero means and biases."""
    rng = np.random.default_rng(seed)
    draw = {"scale": lambda n: rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n),
            "bias": lambda n: rng.normal(0, 0.1, n), "mean": lambda n: rng.normal(0, 0.1, n),
            "var": lambda n: rng.uniform(0.5, 2.0, n)}
    bns = set(fold.batch_norm_paths(params))

    def visit(tree, path):
        if path in bns:
            return {k: draw[k](v.shape[0]).astype(np.float32) for k, v in tree.items()}
        if isinstance(tree, dict):
            return {k: visit(v, f"{path}/{k}" if path else k) for k, v in tree.items()}
        return tree
    return visit(params, "")


@pytest.fixture(scope="module")
def tiny_rn():
    model, params = clip.init("tiny-rn", seed=0)
    return model, _randomize_batch_norm(params)


def _images(batches=2, batch=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, size, size, 3)).astype(np.float32) for _ in range(batches)]


@pytest.fixture(scope="module")
def calibrated(tiny_rn):
    """name -> `tiny_rn` calibrated for the preset `name` on `_images()` and TEXTS, computed
    once for the tests that only read it: every calibration traces its own programs, which
    costs more than the tests' checks."""
    model, params = tiny_rn
    return functools.cache(
        lambda name: quant.calibrate(model, params, name, images=_images(), texts=TEXTS))


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _convs(layers):
    """Every conv of a ModifiedResNet, by hand from OpenAI's architecture."""
    names = [f"visual/conv{i}" for i in (1, 2, 3)]
    for stage, depth in enumerate(layers, 1):
        for j in range(depth):
            names += [f"visual/layer{stage}_{j}/conv{i}" for i in (1, 2, 3)]
            if j == 0:
                names.append(f"visual/layer{stage}_{j}/downsample_0")
    return names


def test_paper_preset_quantizes_every_conv_and_the_attention_pool(tiny_rn, calibrated):
    model, params = tiny_rn
    qstate = calibrated("w4a4attn8")
    pool = [f"visual/attnpool/{n}_proj" for n in "qkv"] + ["visual/attnpool/c_proj"]
    visual_weights = {n for n in qstate.weights if n.startswith("visual/")}
    assert visual_weights == set(_convs(model.config.vision.layers)) | set(pool)
    visual_acts = {n for n in qstate.acts if n.startswith("visual/")}
    assert visual_acts == (set(_convs(model.config.vision.layers)) | set(pool)
                           | {f"visual/attnpool/{n}" for n in ("q", "k", "v", "logits", "probs")})
    cfg = qstate.config
    assert cfg.spec("weight", "visual/layer2_0/downsample_0").fmt.name == "int4"
    assert cfg.spec("input", "visual/layer2_0/conv2").fmt.name == "uint4"
    assert cfg.spec("attn", "visual/attnpool/logits").fmt.name == "uint8"
    # Kernels per output channel (HWIO: the last axis).
    kernel = params["visual"]["layer3_0"]["conv2"]["kernel"]
    assert qstate.weights["visual/layer3_0/conv2"].scale.shape == (1, 1, 1, kernel.shape[-1])


def test_conv_kernel_and_image_input_match_numpy_references(tiny_rn):
    model, params = tiny_rn
    images = _images(batches=3)
    qstate = quant.calibrate(model, params, "w8a8", images=images, texts=TEXTS)
    # Kernel: symmetric int8 per output channel, MinMax (FQ-ViT: max|w| / 127.5).
    w = np.asarray(params["visual"]["layer2_0"]["conv2"]["kernel"], np.float32)
    scale = np.abs(w).max(axis=(0, 1, 2), keepdims=True) / np.float32(127.5)
    got = np.asarray(qstate.weights["visual/layer2_0/conv2"].scale)
    np.testing.assert_allclose(got, scale, rtol=1e-6)
    # Codes on the reported scale: each channel's extreme sits on the tie +-127.5, which a
    # 1-ulp difference in the scale (XLA divides by multiplying) rounds either way.
    codes = np.clip(np.round(w / got), -128, 127)
    np.testing.assert_array_equal(np.asarray(qstate.kernels["visual/layer2_0/conv2"]),
                                  codes * got)
    # The stem's first conv reads the image: uint8 per tensor, OMSE over all three batches'
    # range, clipping ratio scored on the last batch.
    stacked = np.concatenate(images)
    lo, hi = stacked.min(), stacked.max()

    def qparams(r):
        s = np.float32(max((hi * r - lo * r) / 255.0, np.finfo(np.float32).eps))
        return s, np.float32(np.clip(-np.round(lo * r / s), 0, 255))

    def error(r):
        s, zp = qparams(r)
        q = np.clip(np.round(images[-1] / s) + zp, 0, 255)
        return np.mean(((q - zp) * s - images[-1]) ** 2)

    ratios = [np.float32(1.0 - 0.01 * i) for i in range(90)]
    s, zp = qparams(ratios[int(np.argmin([error(r) for r in ratios]))])
    act = qstate.acts["visual/conv1"]
    np.testing.assert_allclose(np.asarray(act.scale).ravel(), [s], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(act.zero_point).ravel(), [zp])


def test_folded_batch_norm_is_the_same_float_model(tiny_rn, calibrated):
    model, params = tiny_rn
    folded = quant.fold_batchnorm(params)
    images = _images(batches=1)[0]
    np.testing.assert_allclose(clip.encode_image(model, folded, images),
                               clip.encode_image(model, params, images), atol=1e-5, rtol=0)
    # The folded kernel is the conv kernel times the BatchNorm's per-channel factor.
    bn = params["visual"]["layer1_0"]["bn2"]
    factor = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(bn["var"], np.float64)
                                                           + 1e-5)
    np.testing.assert_allclose(folded["visual"]["layer1_0"]["conv2"]["kernel"],
                               np.asarray(params["visual"]["layer1_0"]["conv2"]["kernel"])
                               * factor, rtol=1e-6)
    # Quantized, both stay close to FP; per-channel kernel scales absorb the factor.
    fp = clip.encode_image(model, params, images)
    for p, qstate in ((params, calibrated("w8a8")),
                      (folded, quant.calibrate(model, folded, "w8a8", images=_images(),
                                               texts=TEXTS))):
        assert _cosine(fp, clip.encode_image(model, p, images, qstate=qstate)).min() >= 0.99


def test_a_vit_has_nothing_to_fold():
    _, params = clip.init("tiny", seed=0)
    with pytest.raises(ValueError, match="fold_batchnorm: the model has no BatchNorm"):
        quant.fold_batchnorm(params)


def test_error_grows_as_bits_shrink(tiny_rn, calibrated):
    model, params = tiny_rn
    images = _images()
    fp = clip.encode_image(model, params, images[0])
    errors = []
    for name in ("w8a8", "w6a6", "w4a4attn8"):
        qstate = calibrated(name)
        errors.append(1 - _cosine(fp, clip.encode_image(model, params, images[0],
                                                        qstate=qstate)).mean())
    assert errors[0] < errors[1] < errors[2], errors
    assert errors[0] < 1e-2, errors  # w8a8: cosine >= 0.99


def test_export_reloads_bit_exactly(tiny_rn, calibrated, tmp_path):
    model, params = tiny_rn
    images = _images()
    qstate = calibrated("w4a4attn8")
    sizes = export.save(tmp_path / "q", model, params, qstate)
    assert sizes["integer_bytes"] < sizes["fp32_bytes"] / 4  # 4-bit codes, packed
    model2, params2, qstate2 = export.load(tmp_path / "q")
    assert model2.config == model.config
    np.testing.assert_array_equal(clip.encode_image(model2, params2, images[0], qstate=qstate2),
                                  clip.encode_image(model, params, images[0], qstate=qstate))


def test_prompt_gradient_with_a_quantized_resnet_image_tower(tiny_rn, calibrated):
    """P4Q's signal: context embeddings -> quantized text tower -> cosine logits against the
    quantized ResNet's image features -> cross-entropy. The context gets a gradient."""
    model, params = tiny_rn
    images = _images()
    qstate = calibrated("w4a4attn8")
    tokens = clip.crop_to_eot(clip.tokenize(TEXTS))
    embeddings = model.apply({"params": params}, tokens, method=model.embed_tokens)
    eot = jnp.argmax(tokens, -1)
    image_features = clip.encode_image(model, params, images[0], qstate=qstate)
    labels = jnp.arange(images[0].shape[0]) % len(TEXTS)

    def loss(context):
        x = embeddings.at[:, 1:3].set(context)  # two learned context tokens after SOT
        text = clip.encode.apply(model, params, (x, eot), qstate=qstate,
                                 method=lambda m, a: m.encode_text_embeddings(*a))
        logits = 100 * (image_features / jnp.linalg.norm(image_features, axis=-1,
                                                         keepdims=True)) @ (
            text / jnp.linalg.norm(text, axis=-1, keepdims=True)).T
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    grad = jax.grad(loss)(embeddings[:, 1:3])
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_official_preset_refuses_a_resnet_image_tower(tiny_rn):
    """The public code's ResNet path does not run, so there is nothing to reproduce."""
    model, params = tiny_rn
    with pytest.raises(ValueError, match="its ResNet path does not run"):
        quant.calibrate(model, params, "official", images=_images(), texts=TEXTS)
    # Its text-tower rules alone still apply to a ResNet CLIP.
    text_only = quant.QConfig(name="official", rules=quant.QConfig.parse("official").rules,
                              towers=("text",))
    qstate = quant.calibrate(model, params, text_only, texts=TEXTS)
    assert qstate.weights and all(n.startswith("text/") for n in qstate.weights)


@pytest.fixture(scope="module")
def stale_batch_norm_rn(tmp_path_factory):
    """An open_clip ResNet CLIP (the `tiny-rn` shapes) whose BatchNorm running statistics do
    not match its activations (mean N(0, 0.1), variance U(0.5, 1.5); affine moved by
    0.05 N(0, 1)), as a checkpoint with stale statistics: its activations stay small, so the
    attention pool attends near-uniformly. Read with the project's reader."""
    open_clip = pytest.importorskip("open_clip")
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    config = clip.get_config("tiny-rn")
    v, t = config.vision, config.text
    model_pt = open_clip.model.CLIP(
        embed_dim=config.embed_dim,
        vision_cfg=dict(image_size=v.image_size, layers=v.layers, width=v.width),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                      heads=t.heads, layers=t.layers),
        quick_gelu=True).eval()
    with torch.no_grad():
        for module in model_pt.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.add_(0.05 * torch.randn_like(module.weight))
                module.bias.add_(0.05 * torch.randn_like(module.bias))
    path = tmp_path_factory.mktemp("stale") / "rn.pt"
    torch.save(model_pt.state_dict(), path)
    model, params = clip.load(path)
    calibration, held_out = _images(batches=2), _images(batches=1, seed=1)[0]
    return model, params, calibration, held_out


def _image_tower_only(qconfig):
    return dataclasses.replace(quant.QConfig.parse(qconfig) if isinstance(qconfig, str)
                               else qconfig, towers=("visual",))


def test_stale_batch_norm_statistics_keep_their_features_at_8_bits(stale_batch_norm_rn, caplog):
    """The pool's probabilities all lie near 1/5 (2x2 tokens and their mean): a range that
    excludes 0, which FQ-ViT's clamped zero point cut to [0, hi - lo] (cosine 0.43)."""
    model, params, calibration, held_out = stale_batch_norm_rn
    with caplog.at_level(logging.INFO):
        qstate, report = quant.calibrate(model, params, _image_tower_only("w8a8"),
                                         images=calibration, return_report=True)
    fp = clip.encode_image(model, params, held_out)
    assert _cosine(fp, clip.encode_image(model, params, held_out, qstate=qstate)).min() >= 0.99
    probs = next(s for s in report.sites if s.site == "visual/attnpool/probs")
    assert probs.sqnr_db > 30
    assert report.cosines["image"]["min"] >= 0.99
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_warning_names_the_site_that_collapses(stale_batch_norm_rn, caplog):
    """FQ-ViT's unwidened ranges (`include_zero=False`) on the same model: the features
    collapse, and the warning names the probabilities as the worst site."""
    model, params, calibration, held_out = stale_batch_norm_rn
    fqvit = quant.QConfig(name="w8a8-fqvit", towers=("visual",), rules=tuple(
        dataclasses.replace(rule, spec=dataclasses.replace(rule.spec, include_zero=False))
        for rule in quant.QConfig.parse("w8a8").rules))
    with caplog.at_level(logging.WARNING):
        qstate, report = quant.calibrate(model, params, fqvit, images=calibration,
                                         return_report=True)
    fp = clip.encode_image(model, params, held_out)
    assert _cosine(fp, clip.encode_image(model, params, held_out, qstate=qstate)).max() < 0.9
    assert report.collapsed() == ["image"]
    assert report.worst(1)[0].site == "visual/attnpool/probs"
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "image features" in warning.getMessage()
    assert "visual/attnpool/probs" in warning.getMessage()
