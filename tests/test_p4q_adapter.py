"""P4Q's QAdapter: float math, 8-bit training forward against numpy, frozen evaluation ranges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax.p4q import adapter as adapter_lib

WIDTH = 32


@pytest.fixture(scope="module")
def adapter():
    module = adapter_lib.QAdapter()
    params = module.init(jax.random.key(0), jnp.zeros((1, WIDTH)))["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                          params)  # non-zero biases
    return module, params


def _features(seed, n=16, scale=1.0):
    return scale * np.random.default_rng(seed).normal(size=(n, WIDTH)).astype(np.float32)


def _np_params(params):
    return {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}


def test_float_adapter_is_the_blended_bottleneck(adapter):
    module, params = adapter
    p, f = _np_params(params), _features(0)
    assert p["fc1"]["kernel"].shape == (WIDTH, WIDTH // 4)
    h = np.maximum(f @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    expected = 0.2 * (h @ p["fc2"]["kernel"] + p["fc2"]["bias"]) + 0.8 * f
    np.testing.assert_allclose(module.apply({"params": params}, f), expected, atol=1e-5)


def _np_fake_quant_weight(w):
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True) / 127.5, np.finfo(np.float32).eps)
    return np.clip(np.round(w / scale), -128, 127) * scale


def _np_fake_quant_input(x):
    lo, hi = x.min(), x.max()
    scale = max((hi - lo) / 255, np.finfo(np.float32).eps)
    zp = np.clip(-np.round(lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def test_training_kernels_match_numpy_int8_except_on_ties(adapter):
    """FQ-ViT's symmetric scale (max|w| / 127.5) puts each channel's largest weight exactly
    on a rounding tie, which float32 arithmetic may resolve to either neighbour; every other
    weight must land on exactly the reference's value."""
    _, params = adapter
    quantized = adapter_lib.fake_quant_kernels(params)
    for name in ("fc1", "fc2"):
        w = np.asarray(params[name]["kernel"], np.float64)
        scale = np.abs(w).max(axis=0, keepdims=True) / 127.5
        got = np.asarray(quantized[name]["kernel"], np.float64)
        tie = np.isclose(np.abs(w) / scale, 127.5, rtol=1e-5)
        np.testing.assert_allclose(got[~tie], _np_fake_quant_weight(w)[~tie], rtol=1e-6)
        assert np.all(np.abs(got[tie] - _np_fake_quant_weight(w)[tie]) <= 1.01 * np.broadcast_to(
            scale, w.shape)[tie])
        np.testing.assert_array_equal(quantized[name]["bias"], params[name]["bias"])


def test_training_forward_matches_a_numpy_8bit_reference(adapter):
    module, params = adapter
    kernels = {n: np.asarray(adapter_lib.fake_quant_kernels(params)[n]["kernel"], np.float64)
               for n in ("fc1", "fc2")}
    p, f = _np_params(params), _features(1).astype(np.float64)
    h = np.maximum(_np_fake_quant_input(f) @ kernels["fc1"] + p["fc1"]["bias"], 0)
    out = _np_fake_quant_input(h) @ kernels["fc2"] + p["fc2"]["bias"]
    got = adapter_lib.train_apply(module, params, f.astype(np.float32))
    np.testing.assert_allclose(got, 0.2 * out + 0.8 * f, atol=2e-5)


def test_training_gradients_reach_every_parameter(adapter):
    module, params = adapter
    f = _features(2)
    grads = jax.grad(lambda q: jnp.sum(adapter_lib.train_apply(module, q, f) ** 2))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_evaluation_ranges_are_frozen_after_calibration(adapter):
    module, params = adapter
    qstate = adapter_lib.calibrate(module, params, [_features(3), _features(4)])
    assert set(qstate.acts) == set(qstate.weights) == {"fc1", "fc2"}
    f = _features(5)
    fp = np.asarray(module.apply({"params": params}, f))
    evaluated = np.asarray(adapter_lib.apply(module, params, f, qstate))
    assert np.abs(evaluated - fp).mean() < 0.01 * np.abs(fp).max()
    # Ten times the calibrated range: the frozen input quantizer clips, the per-batch one adapts.
    big = _features(5, scale=10.0)
    fp_big = np.asarray(module.apply({"params": params}, big))
    frozen = np.asarray(adapter_lib.apply(module, params, big, qstate))
    dynamic = np.asarray(adapter_lib.train_apply(module, params, big))
    assert np.abs(frozen - fp_big).max() > 10 * np.abs(dynamic - fp_big).max()
