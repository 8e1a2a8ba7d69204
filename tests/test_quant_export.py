"""Low-bit storage (packed integers in Orbax, bit-exact reload) and the int8 inference path."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from p4q_jax import clip
from p4q_jax import quant
from p4q_jax.clip import architectures
from p4q_jax.quant import export
from p4q_jax.quant import integer

TEXTS = [f"a photo of a {c}." for c in ("cat", "dog", "truck", "ship", "frog", "bird")]


def _images(size, n=2):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(8, size, size, 3)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return clip.init("tiny", seed=2)


@pytest.fixture(scope="module")
def calibrated(tiny):
    """name -> `tiny` calibrated for the preset `name` on `_images(32)` and TEXTS, computed
    once for the tests that only read it: every calibration traces its own programs, which
    costs more than the tests' checks."""
    model, params = tiny
    return functools.cache(
        lambda name: quant.calibrate(model, params, name, images=_images(32), texts=TEXTS))


def test_nibble_packing_by_hand():
    # codes 1, -1, 7, -8, 3 -> nibbles 1, 15, 7, 8, 3 (+ a zero pad) -> bytes 0xF1, 0x87, 0x03
    packed = export.pack_nibbles(np.array([1, -1, 7, -8, 3]))
    np.testing.assert_array_equal(packed, np.array([0xF1, 0x87, 0x03], np.uint8))
    np.testing.assert_array_equal(export.unpack_nibbles(packed, shape=(5,), signed=True),
                                  [1, -1, 7, -8, 3])
    np.testing.assert_array_equal(
        export.unpack_nibbles(export.pack_nibbles(np.array([15, 0, 9])), shape=(3,), signed=False),
        [15, 0, 9])


@pytest.mark.parametrize("signed", [True, False])
def test_nibble_packing_round_trips_random_kernels(signed):
    rng = np.random.default_rng(1)
    codes = rng.integers(-8 if signed else 0, 8 if signed else 16, size=(7, 5, 3))
    packed = export.pack_nibbles(codes)
    assert packed.dtype == np.uint8 and packed.size == (codes.size + 1) // 2
    np.testing.assert_array_equal(export.unpack_nibbles(packed, shape=codes.shape, signed=signed),
                                  codes)


@pytest.mark.parametrize("name", ["w8a8", "w4a4attn8", "official"])
def test_export_reloads_bit_exactly(tmp_path, tiny, calibrated, name):
    model, params = tiny
    qstate = calibrated(name)
    export.save(tmp_path / "q", model, params, qstate)
    model2, params2, qstate2 = export.load(tmp_path / "q")
    assert model2.config == model.config and qstate2.config == qstate.config
    images, tokens = _images(32)[0], clip.tokenize(TEXTS)
    np.testing.assert_array_equal(clip.encode_image(model, params, images, qstate=qstate),
                                  clip.encode_image(model2, params2, images, qstate=qstate2))
    np.testing.assert_array_equal(clip.encode_text(model, params, tokens, qstate=qstate),
                                  clip.encode_text(model2, params2, tokens, qstate=qstate2))


def test_export_stores_the_calibrated_kernels_not_a_requantized_copy(tmp_path, tiny, calibrated):
    """A negative 4-bit extreme w = -7.5 * scale sits on a rounding tie: -8 or -7 depending on
    float op order. The export must keep the calibrated choice, so move one such kernel entry
    to the other side of the tie and check that the reload follows the QState, not the FP."""
    model, params = tiny
    qstate = calibrated("w4a4attn8")
    name = "visual/conv1"
    kernel, p = qstate.kernels[name], qstate.weights[name]
    flipped = jnp.where(kernel == kernel.min(), kernel + p.scale, kernel)  # -8 -> -7 codes
    assert float(jnp.abs(flipped - kernel).max()) > 0
    qstate = qstate.replace(kernels={**qstate.kernels, name: flipped})
    export.save(tmp_path / "q", model, params, qstate)
    _, _, reloaded = export.load(tmp_path / "q")
    np.testing.assert_array_equal(reloaded.kernels[name], flipped)


def test_export_bytes_on_disk(tmp_path):
    """Kernels at most 27% (8-bit) and 14% (4-bit) of their float32 bytes, scales included."""
    config = architectures.vit(embed_dim=128, image_size=32, patch_size=8, vision_width=256,
                         vision_layers=2, text_width=256, text_layers=2)
    model, params = clip.init(config)
    for name, limit in (("w8a8", 0.27), ("w4a4attn8", 0.14)):
        qstate = quant.calibrate(model, params, name, images=_images(32, 1), texts=TEXTS)
        sizes = export.save(tmp_path / name, model, params, qstate)
        ratio = sizes["integer_bytes"] / sizes["fp32_bytes"]
        assert ratio <= limit, (name, sizes, ratio)


def test_export_refuses_to_overwrite_and_load_names_missing_dirs(tmp_path, tiny, calibrated):
    model, params = tiny
    qstate = calibrated("w8a8")
    export.save(tmp_path / "q", model, params, qstate)
    with pytest.raises(FileExistsError, match="q"):
        export.save(tmp_path / "q", model, params, qstate)
    with pytest.raises(FileNotFoundError, match="nothere"):
        export.load(tmp_path / "nothere")


def test_load_of_a_damaged_export_names_the_file(tmp_path, tiny, calibrated, monkeypatch):
    model, params = tiny
    qstate = calibrated("w8a8")
    export.save(tmp_path / "q", model, params, qstate)
    marker = tmp_path / "q" / export.MARKER
    good = marker.read_text()
    marker.write_text(good[: len(good) // 2])  # truncated JSON
    with pytest.raises(clip.CheckpointError, match=f"{marker}: not a readable JSON file"):
        export.load(tmp_path / "q")
    marker.write_text(good)
    for path in (tmp_path / "q" / "integer").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # Orbax's array data files
            path.write_bytes(path.read_bytes()[:9])
    monkeypatch.chdir(tmp_path)  # and a relative path works as well as an absolute one
    with pytest.raises(clip.CheckpointError, match=f"{tmp_path / 'q' / 'integer'}: cannot "
                                                   "restore the arrays"):
        export.load("q")


def _int32_products(model, params, state, method, x):
    """The int32-result dots and convolutions over the batch in the lowered program of one
    tower (not counting Qwix's [1, 1, K] zero-point products)."""
    text = jax.jit(lambda p, x, s: clip.encode.apply(model, p, x, method=method, qstate=s)).lower(
        params, x, state).as_text()
    return sum(1 for line in text.splitlines()
               if ("dot_general" in line or "convolution" in line)
               and f"-> tensor<{len(x)}x" in line and line.endswith("xi32>"))


@pytest.mark.parametrize("name", ["w8a8", "w6a6", "w4a4attn8"])
def test_integer_path_equals_fake_quant(tiny, calibrated, name):
    """Every Dense layer, the patch conv and both attention products run on int8 codes
    (4- and 6-bit codes in int8 containers) and give fake-quant's features bit for bit
    (fake-quant sums the same codes, exactly, in float32); with the products left to
    fake-quant (CPUs' default) too."""
    model, params = tiny
    qstate = calibrated(name)
    int_state = integer.integer_state(qstate, params, products=True)
    dense_only = integer.integer_state(qstate, params, products=False)
    blocks = model.config.vision.layers + model.config.text.layers
    # in_proj, out_proj, c_fc, c_proj of every block, the two projections, the patch conv.
    assert len(int_state.kernels) == 4 * blocks + 3
    bits = qstate.config.spec("weight", "visual/conv1").bits
    for kernel in int_state.kernels.values():
        codes = np.asarray(kernel.qvalue)
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 2 ** (bits - 1)
    images, tokens = _images(32)[0], clip.tokenize(TEXTS)
    for encode, x in ((clip.encode_image, images), (clip.encode_text, tokens)):
        fake = np.asarray(encode(model, params, x, qstate=qstate))
        for state in (int_state, dense_only):
            real = np.asarray(encode(model, params, x, qstate=state))
            np.testing.assert_array_equal(real, fake)
    vision, text = model.config.vision, model.config.text
    # 4 Dense + q k^T + p v per block, the projection, and (images) the patch conv.
    assert _int32_products(model, params, int_state, model.encode_image, images) == (
        6 * vision.layers + 2)
    assert "convolution" not in jax.jit(
        lambda p, x, s: clip.encode.apply(model, p, x, method=model.encode_image, qstate=s)
    ).lower(params, images, int_state).as_text()  # the patch conv is a dot over patches
    assert _int32_products(model, params, int_state, model.encode_text, tokens) == (
        6 * text.layers + 1)
    assert _int32_products(model, params, dense_only, model.encode_image, images) == (
        4 * vision.layers + 2)
    assert _int32_products(model, params, dense_only, model.encode_text, tokens) == (
        4 * text.layers + 1)


def test_integer_einsum_against_numpy():
    """The zero-point expansion of both attention products, against float64 numpy."""
    rng = np.random.default_rng(0)
    for equation, shapes in (("bqhd,bkhd->bhqk", ((2, 5, 3, 4), (2, 6, 3, 4))),
                             ("bhqk,bkhd->bqhd", ((2, 3, 5, 6), (2, 6, 3, 4)))):
        a, b = (rng.integers(-128, 128, size=s).astype(np.int8) for s in shapes)
        za, zb = -77, 31
        got = integer._integer_einsum(equation, jnp.asarray(a), za, jnp.asarray(b), zb)
        expected = np.einsum(equation, a.astype(np.float64) - za, b.astype(np.float64) - zb)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_resnet_convs_keep_the_fake_quant_path():
    """Padded convs would need a position-dependent zero-point term: only a ViT's patch
    embedding runs as an integer conv; a ResNet's stem and blocks stay fake-quant. Only the
    image tower is calibrated: the convs are all there, and the text tower's calibration
    would only add its own programs to trace."""
    model, params = clip.init("tiny-rn", seed=0)
    image_only = dataclasses.replace(quant.QConfig.parse("w8a8"), towers=("visual",))
    qstate = quant.calibrate(model, params, image_only, images=_images(64))
    int_state = integer.integer_state(qstate, params)
    images = _images(64)[0]
    fake = np.asarray(clip.encode_image(model, params, images, qstate=qstate))
    real = np.asarray(clip.encode_image(model, params, images, qstate=int_state))
    np.testing.assert_allclose(real, fake, atol=1e-5 * np.abs(fake).max())
    assert "visual/conv1" in int_state.kernels  # its codes are there, but it runs fake-quant:
    without_stem = int_state.replace(
        kernels={k: v for k, v in int_state.kernels.items() if k != "visual/conv1"})
    assert _int32_products(model, params, int_state, model.encode_image, images) == (
        _int32_products(model, params, without_stem, model.encode_image, images))


def test_inference_state_falls_back_where_nothing_fits(tiny, calibrated):
    """`official` quantizes its inputs per channel, which no integer product can take: the
    job's inference state is then the QState itself, as with quant.integer=False."""
    model, params = tiny
    official = calibrated("official")
    with pytest.raises(ValueError, match="'official' has no Dense layer.*nothing runs in int8"):
        integer.integer_state(official, params)
    assert integer.inference_state(official, params, True) is official
    w8 = calibrated("w8a8")
    assert integer.inference_state(w8, params, False) is w8
    assert isinstance(integer.inference_state(w8, params, True), integer.IntegerState)
    faster, _ = integer.int8_dot_is_faster()
    assert isinstance(integer.inference_state(w8, params, None), integer.IntegerState) == faster
    assert integer.inference_state(None, params, True) is None


def test_agrees_with_qwix_own_w8a8(tiny, calibrated):
    """Independent cross-check: Qwix's PTQ of the same model (absmax weights, dynamic int8
    activations) lands as close to our calibrated W8A8 as both do to float."""
    model, params = tiny
    qstate = calibrated("w8a8")
    rules = [qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
    qwix_model = qwix.quantize_model(model, qwix.PtqProvider(rules),
                                     methods=("encode_image", "encode_text"))
    size, length = model.config.vision.image_size, model.config.text.context_length
    abstract = jax.eval_shape(lambda: qwix_model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)))
    qwix_params = qwix.quantize_params(params, abstract["params"])
    images, tokens = _images(32)[0], clip.tokenize(TEXTS)

    def cosine(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    for method, x, encode in (("encode_image", images, clip.encode_image),
                              ("encode_text", tokens, clip.encode_text)):
        theirs = qwix_model.apply({"params": qwix_params}, x, method=method)
        ours = encode(model, params, x, qstate=qstate)
        fp = encode(model, params, x)
        assert cosine(theirs, ours).min() > 0.99
        assert cosine(theirs, fp).min() > 0.99


def test_attention_products_stay_fake_quant_on_cpus(tiny, calibrated):
    """XLA:CPU's int8 dots lose to float32 on the heads' small matrices: the default
    IntegerState on a CPU leaves the products to fake-quant (an accelerator's keeps them)."""
    _, params = tiny
    qstate = calibrated("w8a8")
    assert jax.devices()[0].platform == "cpu"
    assert integer.integer_state(qstate, params).products is False
    assert integer.inference_state(qstate, params, True).products is False


def test_export_with_non_finite_weights_names_the_tensor(tmp_path, tiny, calibrated):
    model, params = tiny
    qstate = calibrated("w8a8")
    broken = jax.tree.map(np.array, params)
    broken["text"]["ln_final"]["scale"][:2] = np.nan
    export.save(tmp_path / "q", model, broken, qstate)
    with pytest.raises(clip.CheckpointError, match=rf"{tmp_path / 'q' / 'float'}: "
                                                   r"params/text/ln_final/scale holds 2 "
                                                   "non-finite values"):
        export.load(tmp_path / "q")
