"""Calibration of a CLIP: which sites it quantizes, how close the quantized model stays to FP,
straight-through gradients through the quantized text tower, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import quant
from p4q_jax.clip import storage
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.quant import calibration
from p4q_jax.quant import observers
from p4q_jax.quant import qconfig
from p4q_jax.quant import sites

CLASSES = ["cat", "dog", "truck", "ship", "frog", "horse", "bird", "deer"]
TEXTS = [t.format(c) for c in CLASSES for t in ("a photo of a {}.", "a blurry photo of the {}.")]


def _images(size, *, batches=2, batch=8):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(batch, size, size, 3)).astype(np.float32) for _ in range(batches)]


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def tiny():
    return clip.init("tiny", seed=0)


def _calibrate_preset(model, params, name, **kwargs):
    """`name` on the two 32 px batches and TEXTS in two chunks of 8 prompts (one program
    shape, as the image batches), with the FP text features: (QState, features)."""
    return quant.calibrate(model, params, name, images=_images(32), texts=TEXTS,
                           text_batch_size=8, return_text_features=True, **kwargs)


@pytest.fixture(scope="module")
def preset(tiny):
    """name -> `_calibrate_preset(name)`, computed once for the tests that only read it: every
    calibration traces its own programs, which costs more than the tests' checks."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = _calibrate_preset(*tiny, name)
        return done[name]
    return get


def _features(model, params, qstate, images, tokens):
    return (clip.encode_image(model, params, images, qstate=qstate),
            clip.encode_text(model, params, tokens, qstate=qstate))


def test_official_preset_quantizes_exactly_the_public_codes_sites(tiny, preset):
    model, _ = tiny
    qstate, _ = preset("official")
    blocks = [f"{tower}/transformer/resblocks_{i}/"
              for tower, layers in (("visual", model.config.vision.layers),
                                    ("text", model.config.text.layers)) for i in range(layers)]
    expected_weights = {"visual/conv1"} | {b + s for b in blocks for s in
                                           ("attn/in_proj", "attn/out_proj", "mlp/c_fc", "mlp/c_proj")}
    expected_acts = {"visual/conv1"} | {b + s for b in blocks for s in
                                        ("attn/in_proj", "mlp/c_fc", "mlp/c_proj")}
    assert set(qstate.weights) == expected_weights
    assert set(qstate.acts) == expected_acts
    cfg = qstate.config
    assert cfg.spec("weight", "visual/conv1").fmt.name == "int4"
    assert cfg.spec("input", "visual/conv1").fmt.name == "uint4"
    assert {cfg.spec("weight", n).fmt.name for n in expected_weights - {"visual/conv1"}} == {"int8"}
    assert {cfg.spec("input", n).fmt.name for n in expected_acts - {"visual/conv1"}} == {"uint8"}
    # Activations per channel (the public code's CALIBRATION_MODE_A_v = 'channel_wise').
    width = model.config.text.width
    assert qstate.acts["text/transformer/resblocks_0/attn/in_proj"].scale.shape == (1, 1, width)
    assert qstate.weights["text/transformer/resblocks_0/mlp/c_fc"].scale.shape == (
        1, model.config.text.mlp_dim)


def test_image_input_qparams_match_a_numpy_omse_on_the_images(preset):
    """The conv1 input is the image itself: recompute its per-RGB-channel OMSE in numpy
    (the range over both batches, the clipping ratio scored on the last one)."""
    images = _images(32)
    got = preset("official")[0].acts["visual/conv1"]
    stacked = np.concatenate(images)
    lo = stacked.min(axis=(0, 1, 2), keepdims=True)
    hi = stacked.max(axis=(0, 1, 2), keepdims=True)
    qmax = 15.0  # uint4
    eps = np.finfo(np.float32).eps

    def qparams(r):
        scale = np.maximum((hi * r - lo * r) / qmax, eps).astype(np.float32)
        zp = np.clip(-np.round(lo * r / scale), 0, qmax).astype(np.float32)
        return scale, zp

    def error(r):
        scale, zp = qparams(r)
        q = np.clip(np.round(images[-1] / scale) + zp, 0, qmax)
        return np.mean(((q - zp) * scale - images[-1]) ** 2)

    ratios = [np.float32(1.0 - 0.01 * i) for i in range(90)]
    best = ratios[int(np.argmin([error(r) for r in ratios]))]
    scale, zp = qparams(best)
    np.testing.assert_allclose(np.asarray(got.scale), scale, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.zero_point), zp)


def test_error_grows_as_bits_shrink(tiny, preset):
    model, params = tiny
    images, tokens = _images(32), clip.tokenize(TEXTS)
    fp = _features(model, params, None, images[0], tokens)
    errors = []
    for name in ("w8a8", "w6a6", "w4a4attn8"):
        qstate, _ = preset(name)
        q = _features(model, params, qstate, images[0], tokens)
        errors.append([1 - _cosine(a, b).mean() for a, b in zip(fp, q)])
    errors = np.asarray(errors)  # [config, tower]
    assert np.all(errors[0] < errors[1]) and np.all(errors[1] < errors[2]), errors
    assert np.all(errors[0] < 1e-3), errors


def test_text_only_config_leaves_the_image_tower_in_float(tiny):
    model, params = tiny
    base = quant.QConfig.parse("w8a8")
    text_only = quant.QConfig(name="w8a8-text", rules=base.rules, towers=("text",))
    qstate = quant.calibrate(model, params, text_only, texts=TEXTS)  # no images needed
    assert all(name.startswith("text/") for name in (*qstate.acts, *qstate.weights))
    images = _images(32)[0]
    np.testing.assert_array_equal(clip.encode_image(model, params, images, qstate=qstate),
                                  clip.encode_image(model, params, images))


def test_ptf_layernorm_inputs_and_log2_probabilities(tiny):
    """The FQ-ViT options: PTF on every LayerNorm input, log2 on the softmax output."""
    model, params = tiny
    base = quant.QConfig.parse("w8a8")
    rules = (quant.Rule(kind="norm", pattern=".", spec=qconfig.act_spec(
                 8, observer="ptf", per_channel=True)),
             quant.Rule(kind="attn", pattern="/probs$", spec=qconfig.act_spec(4, observer="log2")),
             *base.rules)
    cfg = quant.QConfig(name="w8a8-ptf-log2", rules=rules)
    qstate = quant.calibrate(model, params, cfg, images=_images(32), texts=TEXTS)
    norms = [n for n in qstate.acts if n.endswith(("ln_1", "ln_2", "ln_pre", "ln_post", "ln_final"))]
    layers = model.config.vision.layers + model.config.text.layers
    assert len(norms) == 2 * layers + 3
    scale = np.asarray(qstate.acts["visual/transformer/resblocks_0/ln_1"].scale).ravel()
    ratios = scale.max() / scale  # per-channel scales are power-of-two fractions of the largest
    np.testing.assert_allclose(ratios, 2.0 ** np.round(np.log2(ratios)), rtol=1e-6)
    assert not any(n.endswith("/probs") for n in qstate.acts)  # log2 needs no parameters
    probs = []

    def record(kind, name, x):
        if name.endswith("/probs"):
            probs.append(qstate.handler(kind, name, x))
        return qstate.handler(kind, name, x)

    with sites.intercept(record):
        model.apply({"params": qstate.quantized_params(params)}, clip.tokenize(TEXTS),
                    method=model.encode_text)
    p = np.asarray(probs[0])
    nonzero = p[p > 0]
    np.testing.assert_array_equal(nonzero, 2.0 ** np.round(np.log2(nonzero)))
    assert nonzero.min() >= 2.0**-15


def test_calibration_is_a_pure_function(tiny, preset):
    """A second calibration on the same inputs equals the shared one."""
    jax.tree.map(np.testing.assert_array_equal, preset("w4a4attn8"),
                 _calibrate_preset(*tiny, "w4a4attn8"))


def test_returns_the_fp_text_features_it_computed(tiny, preset):
    """The shared calibrations chunk the 16 prompts by 8: the features of both chunks."""
    model, params = tiny
    _, features = preset("w8a8")
    np.testing.assert_allclose(features, clip.encode_text(model, params, clip.tokenize(TEXTS)),
                               atol=1e-5)


def test_prompt_gradient_through_the_quantized_text_tower(tiny, preset):
    """What P4Q trains: embeddings -> quantized text tower -> loss. STE keeps it alive."""
    model, params = tiny
    qstate, _ = preset("w4a4attn8")
    tokens = clip.crop_to_eot(clip.tokenize(TEXTS))
    embeddings = model.apply({"params": params}, tokens, method=model.embed_tokens)
    eot = jnp.argmax(tokens, -1)
    target = jax.random.normal(jax.random.key(1), (len(TEXTS), model.config.embed_dim))

    def loss(x, qstate):
        feats = clip.encode.apply(model, params, (x, eot), qstate=qstate,
                                  method=lambda m, a: m.encode_text_embeddings(*a))
        return jnp.mean((feats - target) ** 2)

    grad_q = jax.grad(loss)(embeddings, qstate)
    grad_fp = jax.grad(loss)(embeddings, None)
    assert np.all(np.isfinite(grad_q)) and np.abs(grad_q).max() > 0
    # The straight-through gradient approximates the FP one (same direction).
    assert _cosine(grad_q.ravel(), grad_fp.ravel()) > 0.5


def _open_clip_vit_b32():
    """ViT-B/32 with open_clip's random initialization (OpenAI's scheme), read as a state
    dict: torch draws it in seconds, where `clip.init` compiles and runs a program for 88M
    parameters at the tests' low XLA optimization level (docs/results.md)."""
    import open_clip  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    config = clip.get_config("ViT-B/32")
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    return clip.CLIP(config), storage.openai_to_flax(state, config)


def test_vit_b32_w8a8_stays_close_to_fp():
    model, params = _open_clip_vit_b32()
    images = _images(224, batches=2, batch=4)
    tokens = clip.tokenize(TEXTS)
    qstate = quant.calibrate(model, params, "w8a8", images=images, texts=TEXTS)
    fp = _features(model, params, None, images[0], tokens)
    q = _features(model, params, qstate, images[0], tokens)
    for a, b in zip(fp, q):
        assert _cosine(a, b).min() >= 0.99


def test_empty_calibration_sets_are_refused(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="images: .*needs at least one image batch"):
        quant.calibrate(model, params, "w8a8", images=[], texts=TEXTS)
    with pytest.raises(ValueError, match="texts: .*needs prompts"):
        quant.calibrate(model, params, "w8a8", images=_images(32), texts=[])


def test_nan_statistics_are_refused(tiny):
    model, params = tiny
    bad = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0].set(jnp.nan) if "c_fc" in jax.tree_util.keystr(path)
        and "kernel" in jax.tree_util.keystr(path) else x, params)
    with pytest.raises(FloatingPointError, match=r"NaN/Inf .* weight sites \[.*mlp/c_fc"):
        quant.calibrate(model, bad, "w8a8", images=_images(32), texts=TEXTS)


def test_nan_images_are_refused_naming_the_first_site(tiny):
    model, params = tiny
    images = _images(32)
    images[0][1, 3, 3, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"activation sites \['visual/conv1'"):
        quant.calibrate(model, params, "w8a8", images=images, texts=TEXTS)


@pytest.mark.parametrize("name, match", [
    ("w9a8", r"bits=9 is not supported"),
    ("w4", r"unknown quantization config 'w4'"),
    ("w1a8", r"bits=1 is not supported"),
])
def test_bad_config_names(name, match):
    with pytest.raises(ValueError, match=match):
        quant.QConfig.parse(name)



@pytest.mark.parametrize("texts", ["a photo of a cat.", b"a photo of a cat."],
                         ids=["str", "bytes"])
def test_one_string_of_texts_is_refused(tiny, texts):
    """A bare string used to calibrate on one prompt per character."""
    model, params = tiny
    with pytest.raises(TypeError, match=r"texts: expected a list of prompt strings, got one "
                                        r"(str|bytes) .*one prompt per character"):
        quant.calibrate(model, params, "w8a8", images=_images(32), texts=texts)


def test_one_image_array_is_one_batch(tiny):
    """One array [B, H, W, 3] used to fail with numpy's "truth value ... is ambiguous"."""
    model, params = tiny
    base = quant.QConfig.parse("w8a8")
    image_only = quant.QConfig(name="w8a8-visual", rules=base.rules, towers=("visual",))
    batch = _images(32)[0]
    one = quant.calibrate(model, params, image_only, images=batch)
    listed = quant.calibrate(model, params, image_only, images=[batch])
    assert "visual/conv1" in one.acts
    jax.tree.map(np.testing.assert_array_equal, one, listed)


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((32, 32, 3), np.float32), ValueError,
     r"images: expected one batch float \[B, 32, 32, 3\] .*got an array of shape \(32, 32, 3\)"),
    ([np.zeros((2, 64, 64, 3), np.float32)], ValueError,
     r"images\[0\]: expected float \[B, 32, 32, 3\] .*got float32 \(2, 64, 64, 3\)"),
    ([np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 32, 32, 3), np.uint8)], ValueError,
     r"images\[1\]: expected float \[B, 32, 32, 3\] \(CLIP-normalized, e\.g\. from "
     r"clip\.preprocess\), got uint8"),
    ([np.zeros((0, 32, 32, 3), np.float32)], ValueError, r"images\[0\]: .*got float32 \(0, 32"),
    ({"image": np.zeros((2, 32, 32, 3), np.float32), "label": np.zeros(2)}, TypeError,
     r"images: expected an array .*got dict with keys \['image', 'label'\]"),
    ([{"image": np.zeros((2, 32, 32, 3), np.float32)}], TypeError,
     r"images\[0\]: expected an array .*got dict with keys \['image'\]"),
], ids=["one-image", "wrong-size", "uint8", "empty-batch", "batch-dict", "list-of-dicts"])
def test_bad_image_batches_are_refused_by_name(tiny, images, error, match):
    model, params = tiny
    with pytest.raises(error, match=match):
        quant.calibrate(model, params, "w8a8", images=images, texts=TEXTS)


def test_calibrate_module_takes_one_array_and_checks_batch_shapes():
    module = adapter_lib.QAdapter()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    features = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    one = quant.calibrate_module(module, params, adapter_lib.QCONFIG, features)
    jax.tree.map(np.testing.assert_array_equal, one,
                 quant.calibrate_module(module, params, adapter_lib.QCONFIG, [features]))
    with pytest.raises(ValueError, match=r"batches\[1\]: expected a non-empty batch \[B, 8\], "
                                         r"got \(4, 6\)"):
        quant.calibrate_module(module, params, adapter_lib.QCONFIG, [features, features[:4, :6]])


def _numpy_omse(x, lo, hi, qmax):
    """FQ-ViT's per-tensor OMSE on an unsigned grid, rewritten in numpy: (scale, zero point)."""
    eps = np.finfo(np.float32).eps

    def qparams(r):
        scale = np.float32(max((hi * r - lo * r) / qmax, eps))
        return scale, np.float32(np.clip(-np.round(lo * r / scale), 0, qmax))

    def error(r):
        scale, zp = qparams(r)
        q = np.clip(np.round(x / scale) + zp, 0, qmax)
        return np.mean(((q - zp) * scale - x) ** 2)

    ratios = [np.float32(1.0 - 0.01 * i) for i in range(90)]
    return qparams(ratios[int(np.argmin([error(r) for r in ratios]))])


def _site_input(model, params, method, x, site):
    seen = []

    def record(kind, name, a):
        if name == site:
            seen.append(np.asarray(a))
        return a

    with sites.intercept(record):
        model.apply({"params": params}, x, method=method)
    return seen[0]


def _unbudgeted_images():
    """Three batches, the first (not the last) the widest."""
    images = _images(32, batches=3)
    images[0] = images[0] * 3.0
    return images


@pytest.fixture(scope="module")
def unbudgeted(tiny):
    """w4a4attn8 with no element budget (every row scored), TEXTS in chunks of 3, on
    `_unbudgeted_images`: the text test reads a text site, the image test the image input."""
    model, params = tiny
    return quant.calibrate(model, params, "w4a4attn8", texts=TEXTS, text_batch_size=3,
                           images=_unbudgeted_images(), search_max_elements=None)


def test_balanced_text_search_scores_every_prompt_up_to_its_end_of_text(tiny, unbudgeted):
    """All rows (no element budget): OMSE on the rows of every prompt up to its EOT token,
    against the same search in numpy on the FP activations."""
    model, params = tiny
    qstate = unbudgeted
    site = "text/transformer/resblocks_1/mlp/c_fc"
    tokens = clip.crop_to_eot(clip.tokenize(TEXTS))
    a = _site_input(model, params, model.encode_text, tokens, site).astype(np.float64)
    lengths = np.argmax(tokens, -1) + 1
    rows = np.concatenate([a[i, :n] for i, n in enumerate(lengths)])
    assert len(rows) < a.shape[0] * a.shape[1]  # the padding after EOT is left out
    scale, zp = _numpy_omse(rows, a.min(), a.max(), 15.0)  # uint4; min/max over everything
    np.testing.assert_allclose(np.asarray(qstate.acts[site].scale), scale, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(qstate.acts[site].zero_point), zp)


def test_balanced_image_search_scores_every_batch(tiny, unbudgeted):
    """The patch embedding's input is the images: its OMSE runs on all of them (three
    batches), not the last batch as FQ-ViT and `search_rows="last"` do."""
    model, params = tiny
    images = _unbudgeted_images()  # the widest batch is not the last
    stacked = np.concatenate(images).astype(np.float64)
    balanced = unbudgeted.acts["visual/conv1"]
    last = quant.calibrate(model, params, "w4a4attn8", images=images, texts=TEXTS,
                           search_max_elements=None, search_rows="last").acts["visual/conv1"]
    scale, _ = _numpy_omse(stacked, stacked.min(), stacked.max(), 15.0)
    np.testing.assert_allclose(np.asarray(balanced.scale), scale, rtol=1e-5)
    scale_last, _ = _numpy_omse(images[-1].astype(np.float64), stacked.min(), stacked.max(), 15.0)
    np.testing.assert_allclose(np.asarray(last.scale), scale_last, rtol=1e-5)
    assert abs(scale / scale_last - 1) > 0.05  # the two rules differ on this data


LONG_TEXTS = TEXTS + [t.format(c) for c in CLASSES
                      for t in ("art of the {}.", "a {} in the wild.")]
BUDGETED = dict(search_max_elements=2**10)


@pytest.fixture(scope="module")
def budgeted(tiny):
    """search_rows -> w4a4attn8 with an element budget on three 32 px batches and
    LONG_TEXTS in chunks of 5, computed once for the two tests below."""
    model, params = tiny
    done = {}

    def get(search_rows):
        if search_rows not in done:
            done[search_rows] = quant.calibrate(
                model, params, "w4a4attn8", images=_images(32, batches=3), texts=LONG_TEXTS,
                text_batch_size=5, search_rows=search_rows, **BUDGETED)
        return done[search_rows]
    return get


def test_balanced_scales_depend_on_neither_text_batch_size_nor_order(tiny, budgeted):
    """The default: every prompt draws its own rows by its tokens, every image by its place
    in the calibration set (element budget on), so neither the chunking nor the prompt order
    moves a scale. The public code's rule ("last": the final chunk) moves with them."""
    model, params = tiny
    texts, images = LONG_TEXTS, _images(32, batches=3)
    shuffled = list(np.random.default_rng(1).permutation(texts))
    rebatched = [np.concatenate(images)[i:i + 12] for i in range(0, 24, 12)]

    def scales(qstate):
        return {k: np.asarray(v.scale) for k, v in qstate.acts.items()}

    def scales_of(search_rows, texts, images, text_batch_size):
        return scales(quant.calibrate(model, params, "w4a4attn8", images=images, texts=texts,
                                      text_batch_size=text_batch_size, search_rows=search_rows,
                                      **BUDGETED))

    base = scales(budgeted("balanced"))  # texts, images, text_batch_size=5
    for other in (scales_of("balanced", shuffled, rebatched, 64),
                  scales_of("balanced", texts[::-1], images, 7)):
        for name in base:
            np.testing.assert_allclose(other[name], base[name], rtol=1e-5, err_msg=name)
    last_a, last_b = scales(budgeted("last")), scales_of("last", shuffled, images, 64)
    moved = max(np.max(np.abs(last_a[n] / last_b[n] - 1)) for n in last_a if n.startswith("text/"))
    assert moved > 0.01


@pytest.mark.parametrize("search_rows", ["balanced", "last"])
def test_images_from_a_generator_calibrate_as_the_list_does(tiny, budgeted, search_rows):
    """A generator (the p4q job's calibration batches, decoded as they are read) is read
    once and gives the scales of the same batches as a list; its image count is checked."""
    model, params = tiny
    images = _images(32, batches=3)
    kwargs = dict(texts=LONG_TEXTS, text_batch_size=5, search_rows=search_rows, **BUDGETED)
    listed = budgeted(search_rows)
    reads = []

    def stream():
        for batch in images:
            reads.append(len(reads))
            yield batch

    streamed = quant.calibrate(model, params, "w4a4attn8", images=stream(), num_images=24,
                               **kwargs)
    assert reads == [0, 1, 2]
    jax.tree.map(np.testing.assert_array_equal, streamed, listed)
    with pytest.raises(TypeError, match=r"images: a generator is read once.*give num_images="):
        quant.calibrate(model, params, "w4a4attn8", images=(b for b in images), **kwargs)
    for count, match in ((30, r"images: yielded 24 images, but num_images=30"),
                         (16, r"images: yielded more than num_images=16 images")):
        with pytest.raises(ValueError, match=match):
            quant.calibrate(model, params, "w4a4attn8", images=(b for b in images),
                            num_images=count, **kwargs)
    with pytest.raises(ValueError, match=r"images: 24 images given, but num_images=8"):
        quant.calibrate(model, params, "w4a4attn8", images=images, num_images=8, **kwargs)


def test_search_rows_auto_keeps_the_public_rule_for_the_official_preset(tiny, preset):
    model, params = tiny
    resolve = calibration.resolve_search_rows
    assert resolve("auto", quant.QConfig.parse("official")) == "last"
    assert resolve("auto", quant.QConfig.parse("w4a4attn8")) == "balanced"
    assert resolve("balanced", quant.QConfig.parse("official")) == "balanced"
    auto = preset("official")  # search_rows left at "auto"
    jax.tree.map(np.testing.assert_array_equal, auto,
                 _calibrate_preset(model, params, "official", search_rows="last"))
    with pytest.raises(ValueError, match=r"search_rows: expected one of .*got 'first'"):
        quant.calibrate(model, params, "w8a8", images=_images(32), texts=TEXTS,
                        search_rows="first")


def test_sample_rows_draws_a_quota_of_valid_rows_per_sample():
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    valid = np.array([[True] * 5, [True, True, False, False, False]])
    rows, index, weights = observers.sample_rows(x, np.array([7, 9], np.int32), 3,
                                                       valid=valid)
    rows, index, weights = map(np.asarray, (rows, index, weights))
    assert rows.shape == (2, 3, 3) and len(set(index[0])) == 3
    np.testing.assert_array_equal(rows, np.take_along_axis(x, index[..., None], axis=1))
    np.testing.assert_array_equal(weights[0], 1.0)
    assert sorted(index[1][weights[1] > 0]) == [0, 1]  # sample 1 has two valid rows
    again = observers.sample_rows(x[::-1], np.array([9, 7], np.int32), 3,
                                        valid=valid[::-1])
    np.testing.assert_array_equal(np.asarray(again[1])[::-1], index)  # the seed decides


def test_sample_quota_spends_the_element_budget():
    # 100 samples, 10 channels, 5 rows each: a budget of 2000 elements is 200 rows, 2 each.
    assert observers.sample_quota(100, 10, 5, 2000) == (100, 2)
    # 50 rows for 100 samples: 50 samples contribute one row each.
    assert observers.sample_quota(100, 10, 5, 500) == (50, 1)
    assert observers.sample_quota(100, 10, 5, None) == (100, 5)
    assert observers.sample_quota(3, 10, 5, 10**6) == (3, 5)  # never more rows than there are
