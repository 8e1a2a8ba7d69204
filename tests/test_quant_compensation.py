"""QwT's closed-form block compensation: the ridge solve against numpy, block errors on the
calibration data, the export round trip and the int8 path."""

import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import quant
from p4q_jax.clip import model as model_lib
from p4q_jax.quant import compensation
from p4q_jax.quant import export
from p4q_jax.quant import integer

CLASSES = ["cat", "dog", "truck", "ship", "frog", "horse", "bird", "deer"]
TEXTS = [t.format(c) for c in CLASSES for t in ("a photo of a {}.", "a blurry photo of the {}.")]


def _images(size, *, batches=2, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, size, size, 3)).astype(np.float32) for _ in range(batches)]


@pytest.fixture(scope="module")
def tiny():
    return clip.init("tiny", seed=0)


@pytest.fixture(scope="module")
def states(tiny):
    """(PTQ QState, the same compensated) of the tiny model, w4a4attn8."""
    model, params = tiny
    images = _images(32)
    ptq = quant.calibrate(model, params, "w4a4attn8", images=images, texts=TEXTS)
    qwt = compensation.compensate(model, params, ptq, images=images, texts=TEXTS,
                                  text_batch_size=7)  # uneven chunks
    return ptq, qwt


def _blocks(model):
    tokens = clip.crop_to_eot(clip.tokenize(TEXTS))
    lengths = np.asarray(model_lib.eot_index(tokens)) + 1
    valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
    images = np.concatenate(_images(32))
    for tower, method, x, rows in (("visual", model.encode_image, images, None),
                                   ("text", model.encode_text, tokens, valid)):
        layers = getattr(model.config, "vision" if tower == "visual" else "text").layers
        names = [f"{tower}/transformer/resblocks_{i}" for i in range(layers)]
        for i, block in enumerate(names):
            yield block, names[:i], method, x, rows


def _activations(model, params, qwt, block, earlier, method, x, valid):
    """float64 rows (X_q, Y_q, Y_fp) of `block` in the network compensated before it."""
    before = {k: qwt.compensation[k] for k in earlier}
    xq, yq, yfp = compensation.block_activations(
        model, params, qwt.replace(compensation=before), x, method=method, block=block)
    def rows(a):
        a = np.asarray(a, np.float64)
        return a.reshape(-1, a.shape[-1]) if valid is None else a[valid]

    return rows(xq), rows(yq), rows(yfp)


@pytest.fixture(scope="module")
def block_rows(tiny, states):
    """[(block, its valid-position mask or None, X_q, Y_q, Y_fp)] for every block, in order:
    the ridge test and the error test read the same activations."""
    model, params = tiny
    _, qwt = states
    return [(block, valid, *_activations(model, params, qwt, block, earlier, method, x, valid))
            for block, earlier, method, x, valid in _blocks(model)]


def test_compensation_equals_numpy_ridge(tiny, states, block_rows):
    model, _ = tiny
    _, qwt = states
    assert sorted(qwt.compensation) == sorted(b for b, *_ in _blocks(model))
    for block, valid, xq, yq, yfp in block_rows:
        if valid is not None:
            assert len(xq) == valid.sum() < valid.size  # only positions up to EOT
        n, d = xq.shape
        lam = compensation.RIDGE * np.mean(np.sum(xq * xq, axis=0))
        # min |R - [X 1] theta|^2 + lam |W|^2 as one least-squares problem.
        a = np.block([[xq, np.ones((n, 1))], [np.sqrt(lam) * np.eye(d), np.zeros((d, 1))]])
        rhs = np.concatenate([yfp - yq, np.zeros((d, yq.shape[1]))])
        theta = np.linalg.lstsq(a, rhs, rcond=None)[0]
        got = qwt.compensation[block]
        assert got["kernel"].dtype == jnp.float32 and got["kernel"].shape == (d, d)
        for value, expected in ((got["kernel"], theta[:d]), (got["bias"], theta[d])):
            err = np.linalg.norm(np.asarray(value, np.float64) - expected)
            assert err <= 1e-5 * np.linalg.norm(expected), block


def test_compensation_reduces_block_and_feature_errors(tiny, states, block_rows):
    model, params = tiny
    ptq, qwt = states
    for block, _, xq, yq, yfp in block_rows:
        c = qwt.compensation[block]
        before = np.sum((yfp - yq) ** 2)
        after = np.sum((yfp - yq - xq @ np.asarray(c["kernel"], np.float64)
                        - np.asarray(c["bias"], np.float64)) ** 2)
        assert after <= before * (1 + 1e-6), block
        assert after < 0.9 * before, block  # the tiny model's 4-bit error is far from linear-free
    images, tokens = np.concatenate(_images(32)), clip.tokenize(TEXTS)
    for encode, x in ((clip.encode_image, images), (clip.encode_text, tokens)):
        fp = np.asarray(encode(model, params, x), np.float64)
        err = {name: np.linalg.norm(np.asarray(encode(model, params, x, qstate=s)) - fp)
               for name, s in (("ptq", ptq), ("qwt", qwt))}
        assert err["qwt"] < err["ptq"], encode


def test_export_of_a_compensated_model_reloads_to_the_same_features(tmp_path, tiny, states):
    model, params = tiny
    ptq, qwt = states
    sizes = export.save(tmp_path / "qwt", model, params, qwt)
    plain = export.save(tmp_path / "ptq", model, params, ptq)
    stored = sum(4 * (c["kernel"].size + c["bias"].size) for c in qwt.compensation.values())
    assert sizes["compensation_bytes"] >= stored and plain["compensation_bytes"] == 0
    model2, params2, qwt2 = export.load(tmp_path / "qwt")
    assert sorted(qwt2.compensation) == sorted(qwt.compensation)
    images, tokens = _images(32, seed=1)[0], clip.tokenize(TEXTS)
    for encode, x in ((clip.encode_image, images), (clip.encode_text, tokens)):
        np.testing.assert_array_equal(encode(model, params, x, qstate=qwt),
                                      encode(model2, params2, x, qstate=qwt2))
    assert export.load(tmp_path / "ptq")[2].compensation == {}


def test_integer_path_equals_fake_quant_with_compensation(tiny, states):
    model, params = tiny
    ptq, qwt = states
    int_state = integer.integer_state(qwt, params, products=True)
    images, tokens = _images(32, seed=1)[0], clip.tokenize(TEXTS)
    for encode, x in ((clip.encode_image, images), (clip.encode_text, tokens)):
        fake = np.asarray(encode(model, params, x, qstate=qwt))
        np.testing.assert_array_equal(np.asarray(encode(model, params, x, qstate=int_state)), fake)
        assert not np.array_equal(fake, np.asarray(encode(model, params, x, qstate=ptq)))
    # The text tower alone (what a prompt learner holds) keeps its blocks' compensation.
    text_params, text_state = qwt.text_only(params)
    assert sorted(text_state.compensation) == [b for b in sorted(qwt.compensation)
                                               if b.startswith("text/")]
    np.testing.assert_array_equal(clip.encode_text(model, text_params, tokens, qstate=text_state),
                                  clip.encode_text(model, params, tokens, qstate=qwt))


def test_rematerialised_text_tower_applies_each_compensation_once(tiny, states):
    model, params = tiny
    ptq, qwt = states
    tokens = clip.tokenize(TEXTS)
    remat = model.clone(text_remat="blocks")
    compensated = clip.encode_text(model, params, tokens, qstate=qwt)
    assert not np.allclose(compensated, clip.encode_text(model, params, tokens, qstate=ptq))
    np.testing.assert_allclose(clip.encode_text(remat, params, tokens, qstate=qwt), compensated,
                               rtol=1e-5, atol=1e-5)


def test_compensate_refuses_bad_inputs(tiny, states):
    model, params = tiny
    ptq, qwt = states
    with pytest.raises(ValueError, match="already compensated"):
        compensation.compensate(model, params, qwt, texts=TEXTS)
    with pytest.raises(ValueError, match="images, texts or both"):
        compensation.compensate(model, params, ptq)
    with pytest.raises(TypeError, match="texts"):
        compensation.compensate(model, params, ptq, texts="a photo of a cat.")
