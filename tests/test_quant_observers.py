"""Observers against a plain numpy reference written from FQ-ViT's formulas.

Expected values come from the `_ref_*` functions below (numpy, float32 where rounding
matters); the statistics handed to `qparams` are built by the reference too, so each
observer step is checked on its own. Search-based observers (OMSE, PTF) are checked on data
whose best candidate wins by a clear margin, so that float32 summation order cannot decide.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax.quant import observers
from p4q_jax.quant import qconfig

EPS = np.finfo(np.float32).eps
GRIDS = {(8, True): (-128, 127), (8, False): (0, 255), (4, True): (-8, 7), (4, False): (0, 15),
         (2, True): (-2, 1), (2, False): (0, 3)}
MARGIN = 1e-4  # relative gap required between the best search candidate and the rest


def _spec(bits=8, *, signed=False, symmetric=False, per_channel=False, observer="minmax",
          include_zero=False):
    """FQ-ViT's formulas unless `include_zero` (the presets' default: ranges hold 0)."""
    return qconfig.QuantSpec(bits=bits, signed=signed, symmetric=symmetric,
                             per_channel=per_channel, observer=observer,
                             include_zero=include_zero)


def _reduce_axes(x, per_channel):
    return tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))


def _ref_batch_stats(x, *, per_channel, observer):
    x = np.asarray(x, np.float64)
    axes = _reduce_axes(x, per_channel)
    if observer == "percentile":
        lo = np.quantile(x, 1e-4, axis=axes, keepdims=True, method="linear")
        hi = np.quantile(x, 1 - 1e-4, axis=axes, keepdims=True, method="linear")
    else:
        lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    return lo.astype(np.float32), hi.astype(np.float32)


def _ref_range_qparams(lo, hi, *, bits, signed, symmetric, include_zero=False):
    """FQ-ViT: the range is used as is (not widened to 0); scale >= eps; zp on the grid.
    With `include_zero` the range is first widened to hold 0."""
    qmin, qmax = GRIDS[bits, signed]
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if include_zero:
        lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / np.float32((qmax - qmin) / 2), EPS)
        return scale.astype(np.float32), np.zeros_like(scale, np.float32)
    scale = np.maximum((hi - lo) / np.float32(qmax - qmin), EPS).astype(np.float32)
    zero_point = np.clip(np.float32(qmin) - np.round(lo / scale), qmin, qmax)
    return scale, zero_point.astype(np.float32)


def _ref_fake_quant(x, scale, zero_point, qmin, qmax):
    x = np.asarray(x, np.float32)
    scale, zero_point = np.float32(scale), np.float32(zero_point)
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32)


def _ref_omse(lo, hi, x, *, bits, signed, symmetric):
    """Ratios r = 1 - 0.01 i, i = 0..89, on both ends; least whole-tensor MSE, first on ties."""
    qmin, qmax = GRIDS[bits, signed]
    x = np.asarray(x, np.float32)
    errors = []
    for i in range(90):
        r = np.float32(1 - 0.01 * i)
        scale, zp = _ref_range_qparams(lo * r, hi * r, bits=bits, signed=signed,
                                       symmetric=symmetric)
        y = _ref_fake_quant(x, scale, zp, qmin, qmax)
        errors.append(np.mean((x.astype(np.float64) - y) ** 2))
    errors = np.array(errors)
    best = int(np.argmin(errors))
    r = np.float32(1 - 0.01 * best)
    scale, zp = _ref_range_qparams(lo * r, hi * r, bits=bits, signed=signed, symmetric=symmetric)
    return scale, zp, best, errors


def _ref_ptf(lo, hi, x, *, bits, signed):
    """One asymmetric zp from the global range; per channel the scale s / 2^k, k in 0..3,
    with the least per-channel MSE (first on ties)."""
    qmin, qmax = GRIDS[bits, signed]
    x = np.asarray(x, np.float32)
    s, zp = _ref_range_qparams(np.min(lo), np.max(hi), bits=bits, signed=signed, symmetric=False)
    axes = tuple(range(x.ndim - 1))
    errors = np.stack([
        np.mean((x.astype(np.float64) - _ref_fake_quant(x, s / np.float32(2**k), zp, qmin, qmax))
                ** 2, axis=axes)
        for k in range(4)])  # [4, C]
    k = np.argmin(errors, axis=0)
    shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    scale = (s / np.float32(2.0) ** k.astype(np.float32)).astype(np.float32).reshape(shape)
    return scale, np.full(shape, zp, np.float32), k, errors


def _assert_clear_minimum(errors, best, axis=0):
    """The reference's best candidate beats every other by MARGIN (or ties it exactly)."""
    errors = np.moveaxis(np.asarray(errors), axis, 0)
    e_best = np.take_along_axis(errors, np.expand_dims(best, 0), 0)
    others = errors != e_best
    assert np.all(~others | (errors > e_best * (1 + MARGIN) + 1e-12)), "near tie in test data"


def _jit_qparams(spec, stats, x_last):
    """observers.qparams under jit: one compilation instead of one per eager op (speed)."""
    return jax.jit(observers.qparams, static_argnums=0)(spec, stats, x_last)


def _stats(lo, hi):
    return {"lo": jnp.asarray(lo), "hi": jnp.asarray(hi)}


def _check_qparams(got, want_scale, want_zp, *, check_shapes=True):
    """Values first (broadcast to the expected shapes), then the shapes themselves."""
    scale, zp = (np.asarray(a) for a in got)
    np.testing.assert_allclose(np.broadcast_to(scale, np.shape(want_scale)), want_scale,
                               rtol=1e-6, atol=1e-7 * EPS)
    np.testing.assert_array_equal(np.broadcast_to(zp, np.shape(want_zp)), want_zp)  # integers
    if check_shapes:
        assert scale.shape == np.shape(want_scale) and zp.shape == np.shape(want_zp)


# --- batch_stats ----------------------------------------------------------------------------


@pytest.mark.parametrize("observer", ["minmax", "ema", "omse", "ptf"])
def test_batch_stats_min_max_per_tensor_4d_activations(observer):
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
    got = observers.batch_stats(_spec(observer=observer), jnp.asarray(x))
    lo, hi = _ref_batch_stats(x, per_channel=False, observer=observer)
    assert got["lo"].shape == got["hi"].shape == (1, 1, 1, 1)
    np.testing.assert_array_equal(np.asarray(got["lo"]), lo)
    np.testing.assert_array_equal(np.asarray(got["hi"]), hi)


def test_batch_stats_per_channel_conv_kernel_with_zero_channel():
    """A [3, 3, 4, 8] kernel, per output channel: reduce over the first three axes."""
    x = np.random.default_rng(1).normal(size=(3, 3, 4, 8)).astype(np.float32)
    x[..., 5] = 0.0
    spec = _spec(signed=True, symmetric=True, per_channel=True)
    got = observers.batch_stats(spec, jnp.asarray(x))
    lo, hi = _ref_batch_stats(x, per_channel=True, observer="minmax")
    assert got["lo"].shape == got["hi"].shape == (1, 1, 1, 8)
    np.testing.assert_array_equal(np.asarray(got["lo"]), lo)
    np.testing.assert_array_equal(np.asarray(got["hi"]), hi)
    assert lo[..., 5] == 0 and hi[..., 5] == 0


@pytest.mark.parametrize("x", [np.full((4, 6), 0.8, np.float32), np.zeros((4, 6), np.float32),
                               -np.random.default_rng(2).uniform(1, 3, size=(4, 6)).astype(
                                   np.float32)],
                         ids=["constant", "zeros", "all_negative"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_batch_stats_edge_tensors(x, per_channel):
    got = observers.batch_stats(_spec(per_channel=per_channel), jnp.asarray(x))
    lo, hi = _ref_batch_stats(x, per_channel=per_channel, observer="minmax")
    np.testing.assert_array_equal(np.asarray(got["lo"]), lo)
    np.testing.assert_array_equal(np.asarray(got["hi"]), hi)


@pytest.mark.parametrize(("shape", "per_channel"), [((3, 1667), False), ((3, 1667, 4), True)])
def test_batch_stats_percentile_linear_interpolation(shape, per_channel):
    """5001 values per reduction: the 1e-4 / 1 - 1e-4 quantiles fall half-way between two
    order statistics, so linear interpolation is distinguishable from lower/nearest."""
    x = np.random.default_rng(3).standard_t(3, size=shape).astype(np.float32)
    lo, hi = _ref_batch_stats(x, per_channel=per_channel, observer="percentile")
    axes = _reduce_axes(x, per_channel)
    lower = np.quantile(x.astype(np.float64), 1e-4, axis=axes, keepdims=True, method="lower")
    assert not np.allclose(lo, lower, rtol=1e-3)  # the data can tell the methods apart
    assert np.all(lo > x.min(axis=axes, keepdims=True))  # robust to the extreme values
    got = observers.batch_stats(_spec(per_channel=per_channel, observer="percentile"),
                                jnp.asarray(x))
    assert got["lo"].shape == lo.shape
    np.testing.assert_allclose(np.asarray(got["lo"]), lo, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["hi"]), hi, rtol=1e-6, atol=1e-6)


def test_batch_stats_bfloat16_input_gives_float32_stats():
    x32 = np.random.default_rng(4).normal(size=(4, 8)).astype(np.float32)
    x = jnp.asarray(x32, jnp.bfloat16)
    got = observers.batch_stats(_spec(per_channel=True), x)
    lo, hi = _ref_batch_stats(np.asarray(x, np.float32), per_channel=True, observer="minmax")
    assert got["lo"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got["lo"]), lo)
    np.testing.assert_array_equal(np.asarray(got["hi"]), hi)


# --- merge ----------------------------------------------------------------------------------


def _batches(n=3, shape=(1, 4), seed=5):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = rng.normal(size=shape), rng.normal(size=shape)
        out.append((np.minimum(a, b).astype(np.float32), np.maximum(a, b).astype(np.float32)))
    return out


@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile", "omse", "ptf"])
def test_merge_first_batch_is_taken_as_is(observer):
    (lo, hi), = _batches(1)
    got = observers.merge(_spec(observer=observer), None, _stats(lo, hi))
    np.testing.assert_array_equal(np.asarray(got["lo"]), lo)
    np.testing.assert_array_equal(np.asarray(got["hi"]), hi)


@pytest.mark.parametrize("observer", ["ema", "percentile"])
def test_merge_exponential_moving_average(observer):
    spec = _spec(observer=observer)
    running, want_lo, want_hi = None, None, None
    for lo, hi in _batches(4):
        running = observers.merge(spec, running, _stats(lo, hi))
        if want_lo is None:
            want_lo, want_hi = lo, hi
        else:
            want_lo = np.float32(0.9) * want_lo + np.float32(0.1) * lo
            want_hi = np.float32(0.9) * want_hi + np.float32(0.1) * hi
    np.testing.assert_allclose(np.asarray(running["lo"]), want_lo, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(running["hi"]), want_hi, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("observer", ["minmax", "omse", "ptf"])
def test_merge_running_min_max(observer):
    spec = _spec(observer=observer, per_channel=True)
    batches = _batches(4, shape=(1, 1, 6))
    running = None
    for lo, hi in batches:
        running = observers.merge(spec, running, _stats(lo, hi))
    want_lo = np.min([lo for lo, _ in batches], axis=0)
    want_hi = np.max([hi for _, hi in batches], axis=0)
    np.testing.assert_array_equal(np.asarray(running["lo"]), want_lo)
    np.testing.assert_array_equal(np.asarray(running["hi"]), want_hi)


# --- range_qparams --------------------------------------------------------------------------

RANGE_CASES = {
    # name: (bits, signed, symmetric, lo, hi)
    "int8_symmetric": (8, True, True, -0.7, 1.3),
    "uint8_asymmetric": (8, False, False, -0.7, 1.3),
    "int8_asymmetric": (8, True, False, -0.7, 1.3),
    "uint8_symmetric": (8, False, True, -0.7, 1.3),
    "positive_range_not_widened": (8, False, False, 0.5, 2.0),
    "all_negative_asymmetric": (8, False, False, -3.1, -1.0),
    "all_negative_symmetric": (8, True, True, -3.1, -1.0),
    "constant_positive_asymmetric": (8, False, False, 0.8, 0.8),
    "constant_positive_symmetric": (8, True, True, 0.8, 0.8),
    "zeros_asymmetric_unsigned": (8, False, False, 0.0, 0.0),
    "zeros_asymmetric_signed": (8, True, False, 0.0, 0.0),
    "zeros_symmetric": (8, True, True, 0.0, 0.0),
    "int2_symmetric": (2, True, True, -0.9, 0.4),
    "uint2_asymmetric": (2, False, False, -0.9, 0.4),
    "int4_asymmetric": (4, True, False, -0.2, 0.9),
}


@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_range_qparams(case):
    bits, signed, symmetric, lo, hi = RANGE_CASES[case]
    spec = _spec(bits, signed=signed, symmetric=symmetric)
    lo, hi = np.float32(lo), np.float32(hi)
    want_scale, want_zp = _ref_range_qparams(lo, hi, bits=bits, signed=signed, symmetric=symmetric)
    _check_qparams(observers.range_qparams(jnp.asarray(lo), jnp.asarray(hi), spec),
                   want_scale, want_zp)


@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_range_qparams_widened_to_hold_zero(case):
    bits, signed, symmetric, lo, hi = RANGE_CASES[case]
    spec = _spec(bits, signed=signed, symmetric=symmetric, include_zero=True)
    lo, hi = np.float32(lo), np.float32(hi)
    want_scale, want_zp = _ref_range_qparams(lo, hi, bits=bits, signed=signed,
                                             symmetric=symmetric, include_zero=True)
    _check_qparams(observers.range_qparams(jnp.asarray(lo), jnp.asarray(hi), spec),
                   want_scale, want_zp)


def test_a_range_without_zero_is_covered_once_widened():
    """Softmax probabilities of a near-uniform attention over 50 tokens: FQ-ViT's clamped
    zero point maps them all to [0, hi - lo]; widened, each stays within half a step."""
    x = np.linspace(0.0198, 0.0202, 101, dtype=np.float32)
    for include_zero, worst in ((False, 0.019), (True, 0.0202 / 255 / 2 * 1.01)):
        spec = _spec(8, include_zero=include_zero)
        scale, zp = observers.range_qparams(jnp.float32(x.min()), jnp.float32(x.max()), spec)
        error = np.abs(_ref_fake_quant(x, scale, zp, 0, 255) - x).max()
        assert (error > worst) if not include_zero else (error <= worst), (include_zero, error)


def test_presets_widen_their_activation_ranges_and_official_does_not():
    for rule in qconfig.QConfig.parse("w8a8").rules:
        assert rule.spec.include_zero
    assert [r.spec.include_zero for r in qconfig.QConfig.parse("official").rules
            if r.kind == "input"] == [False, False]
    old = qconfig.QConfig.parse("w8a8").to_dict()
    for rule in old["rules"]:
        del rule["spec"]["include_zero"]  # a config saved before the field existed
    assert qconfig.QConfig.from_dict(old) == qconfig.QConfig.parse("w8a8")


def test_range_qparams_hand_computed_values():
    """A few values worked out by hand, as a check on the reference itself."""
    uint8, int8 = _spec(8), _spec(8, signed=True, symmetric=True)
    scale, zp = observers.range_qparams(jnp.float32(0.5), jnp.float32(2.0), uint8)
    np.testing.assert_allclose(float(scale), 1.5 / 255, rtol=1e-6)  # not 2.0 / 255: not widened
    assert float(zp) == 0.0  # 0 - round(85) clipped to the grid
    scale, zp = observers.range_qparams(jnp.float32(-0.7), jnp.float32(1.3), uint8)
    np.testing.assert_allclose(float(scale), 2.0 / 255, rtol=1e-6)
    assert float(zp) == 89.0  # round(0.7 * 255 / 2) = round(89.25)
    scale, zp = observers.range_qparams(jnp.float32(-0.7), jnp.float32(1.3), int8)
    np.testing.assert_allclose(float(scale), 1.3 / 127.5, rtol=1e-6)
    assert float(zp) == 0.0
    scale, zp = observers.range_qparams(jnp.float32(0.0), jnp.float32(0.0), uint8)
    assert float(scale) == EPS and float(zp) == 0.0
    scale, zp = observers.range_qparams(jnp.float32(-3.1), jnp.float32(-1.0), uint8)
    assert float(zp) == 255.0  # 0 - round(-3.1 / (2.1 / 255)) = 376, clipped


@pytest.mark.parametrize(("signed", "symmetric"), [(True, True), (False, False), (True, False)])
def test_range_qparams_per_channel_with_zero_channel(signed, symmetric):
    rng = np.random.default_rng(6)
    lo = -rng.uniform(0.1, 2, size=(1, 1, 1, 8)).astype(np.float32)
    hi = rng.uniform(0.1, 2, size=(1, 1, 1, 8)).astype(np.float32)
    lo[..., 3] = hi[..., 3] = 0.0
    lo[..., 6] = 0.4  # an all-positive channel
    spec = _spec(8, signed=signed, symmetric=symmetric, per_channel=True)
    want_scale, want_zp = _ref_range_qparams(lo, hi, bits=8, signed=signed, symmetric=symmetric)
    assert want_scale[..., 3] == EPS
    _check_qparams(observers.range_qparams(jnp.asarray(lo), jnp.asarray(hi), spec),
                   want_scale, want_zp)


# --- qparams: range observers ---------------------------------------------------------------


@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile"])
@pytest.mark.parametrize(("signed", "symmetric"), [(True, True), (False, False)])
def test_qparams_range_observers_use_the_statistics(observer, signed, symmetric):
    rng = np.random.default_rng(7)
    lo = -rng.uniform(0.1, 2, size=(1, 5)).astype(np.float32)
    hi = rng.uniform(0.1, 2, size=(1, 5)).astype(np.float32)
    x_last = rng.normal(size=(3, 5)).astype(np.float32) * 10  # must not matter
    spec = _spec(4, signed=signed, symmetric=symmetric, per_channel=True, observer=observer)
    want_scale, want_zp = _ref_range_qparams(lo, hi, bits=4, signed=signed, symmetric=symmetric)
    _check_qparams(_jit_qparams(spec, _stats(lo, hi), jnp.asarray(x_last)),
                   want_scale, want_zp)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_minmax_calibration_of_a_conv_kernel(bits):
    """int{bits} symmetric per output channel, MinMax, on a [3, 3, 4, 8] kernel with an
    all-zero channel: batch_stats -> qparams must match the reference end to end."""
    x = np.random.default_rng(8).normal(size=(3, 3, 4, 8)).astype(np.float32)
    x[..., 2] = 0.0
    spec = _spec(bits, signed=True, symmetric=True, per_channel=True)
    lo, hi = _ref_batch_stats(x, per_channel=True, observer="minmax")
    want_scale, want_zp = _ref_range_qparams(lo, hi, bits=bits, signed=True, symmetric=True)
    stats = observers.batch_stats(spec, jnp.asarray(x))
    _check_qparams(observers.qparams(spec, stats, jnp.asarray(x)), want_scale, want_zp)
    assert want_scale.shape == (1, 1, 1, 8) and want_scale[..., 2] == EPS


@pytest.mark.parametrize(("x", "bits", "signed", "symmetric"), [
    (np.full((2, 3, 3, 4), 0.8, np.float32), 8, False, False),
    (np.full((2, 3, 3, 4), 0.8, np.float32), 8, True, True),
    (np.zeros((2, 3, 3, 4), np.float32), 8, False, False),
    (np.zeros((2, 3, 3, 4), np.float32), 2, True, True),
    (-np.random.default_rng(9).uniform(1, 3, size=(2, 3, 3, 4)).astype(np.float32), 8, False,
     False),
    (-np.random.default_rng(9).uniform(1, 3, size=(2, 3, 3, 4)).astype(np.float32), 2, True,
     True),
], ids=["constant_uint8", "constant_int8_sym", "zeros_uint8", "zeros_int2_sym",
        "negative_uint8", "negative_int2_sym"])
def test_minmax_calibration_of_edge_tensors(x, bits, signed, symmetric):
    spec = _spec(bits, signed=signed, symmetric=symmetric)
    lo, hi = _ref_batch_stats(x, per_channel=False, observer="minmax")
    want_scale, want_zp = _ref_range_qparams(lo, hi, bits=bits, signed=signed, symmetric=symmetric)
    stats = observers.batch_stats(spec, jnp.asarray(x))
    _check_qparams(observers.qparams(spec, stats, jnp.asarray(x)), want_scale, want_zp)


def test_qparams_log2_has_no_parameters():
    spec = _spec(4, observer="log2")
    scale, zp = observers.qparams(spec, _stats(np.zeros((1, 1)), np.ones((1, 1))),
                                  jnp.full((2, 3), 0.25))
    assert float(scale) == 1.0 and float(zp) == 0.0


# --- qparams: OMSE --------------------------------------------------------------------------


def _omse_activations(dist, seed):
    """4-D activations with per-channel spreads: heavy-tailed and small (low-bit cases), or
    Gaussian and larger (8-bit cases, where only a dense bulk makes clipping pay off)."""
    rng = np.random.default_rng(seed)
    spread = np.array([1, 2, 0.5, 1, 3, 0.2])
    if dist == "t2":
        return (rng.standard_t(2, size=(2, 4, 4, 6)) * spread + 0.3).astype(np.float32)
    return (rng.normal(size=(2, 16, 16, 6)) * spread + 0.3).astype(np.float32)


@pytest.mark.parametrize(("bits", "signed", "symmetric", "per_channel", "dist", "seed"), [
    (4, False, False, False, "t2", 10),
    (8, False, False, False, "normal", 11),
    (2, False, False, False, "t2", 12),
    (4, True, True, False, "t2", 13),
    (8, False, False, True, "normal", 11),  # the official config's per-channel activations
    (4, True, True, True, "t2", 15),
])
def test_omse_matches_reference(bits, signed, symmetric, per_channel, dist, seed):
    """The best clipping ratio is < 1 for these data, so the search itself is checked."""
    x = _omse_activations(dist, seed)
    lo, hi = _ref_batch_stats(x, per_channel=per_channel, observer="minmax")
    want_scale, want_zp, best, errors = _ref_omse(lo, hi, x, bits=bits, signed=signed,
                                                  symmetric=symmetric)
    assert best > 0  # the search matters for this data
    _assert_clear_minimum(errors, np.array(best))
    spec = _spec(bits, signed=signed, symmetric=symmetric, per_channel=per_channel,
                 observer="omse")
    _check_qparams(_jit_qparams(spec, _stats(lo, hi), jnp.asarray(x)), want_scale, want_zp)


def test_omse_error_is_measured_on_the_last_batch():
    """The running range comes from earlier, wider batches; the error is on x_last."""
    rng = np.random.default_rng(16)
    x_last = rng.normal(size=(4, 32)).astype(np.float32) * 0.5
    lo, hi = np.float32([[-4.0]]), np.float32([[3.0]])
    want_scale, want_zp, best, errors = _ref_omse(lo, hi, x_last, bits=4, signed=False,
                                                  symmetric=False)
    assert best > 30
    _assert_clear_minimum(errors, np.array(best))
    spec = _spec(4, observer="omse")
    _check_qparams(_jit_qparams(spec, _stats(lo, hi), jnp.asarray(x_last)),
                   want_scale, want_zp)


@pytest.mark.parametrize("symmetric", [False, True])
def test_omse_ties_go_to_the_widest_range(symmetric):
    """x_last all zeros quantizes exactly under every candidate: all errors are 0, i = 0."""
    x_last = np.zeros((3, 8), np.float32)
    lo, hi = np.float32([[-2.0]]), np.float32([[5.0]])
    want_scale, want_zp, best, errors = _ref_omse(lo, hi, x_last, bits=8, signed=symmetric,
                                                  symmetric=symmetric)
    assert best == 0 and np.all(errors == 0)
    spec = _spec(8, signed=symmetric, symmetric=symmetric, observer="omse")
    _check_qparams(_jit_qparams(spec, _stats(lo, hi), jnp.asarray(x_last)),
                   want_scale, want_zp)


def test_omse_constant_tensor():
    x = np.full((2, 5), 0.8, np.float32)
    lo, hi = _ref_batch_stats(x, per_channel=False, observer="minmax")
    want_scale, want_zp, _, _ = _ref_omse(lo, hi, x, bits=8, signed=False, symmetric=False)
    spec = _spec(8, observer="omse")
    _check_qparams(_jit_qparams(spec, _stats(lo, hi), jnp.asarray(x)), want_scale, want_zp)


# --- qparams: PTF ---------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "signed", "seed"), [(8, False, 17), (4, False, 18),
                                                      (8, True, 19)])
def test_ptf_matches_reference(bits, signed, seed):
    """4-D activations whose channels span 1/20x to 8x the same spread, an all-zero channel and
    an offset one: the per-channel power-of-two factor must vary across channels."""
    rng = np.random.default_rng(seed)
    amp = np.array([8, 4, 2, 1, 0.5, 0.25, 0.05, 0], np.float32)
    x = (rng.normal(size=(2, 3, 3, 8)) * amp).astype(np.float32)
    x[..., 4] += 1.5
    lo, hi = _ref_batch_stats(x, per_channel=True, observer="minmax")
    want_scale, want_zp, k, errors = _ref_ptf(lo, hi, x, bits=bits, signed=signed)
    assert len(set(k.tolist())) >= 3 and k[7] == 0  # varied factors; zero channel: tie -> k = 0
    _assert_clear_minimum(errors, k)
    spec = _spec(bits, signed=signed, per_channel=True, observer="ptf")
    got = _jit_qparams(spec, _stats(lo, hi), jnp.asarray(x))
    _check_qparams(got, want_scale, want_zp, check_shapes=False)  # shapes: the next test


@pytest.mark.parametrize("shape", [(16, 4), (2, 3, 3, 8)])
def test_ptf_output_shapes(shape):
    """Scale [1, ..., 1, C] (one per channel) and the shared zp broadcast to the same shape."""
    x = np.random.default_rng(21).normal(size=shape).astype(np.float32)
    lo, hi = _ref_batch_stats(x, per_channel=True, observer="minmax")
    spec = _spec(8, per_channel=True, observer="ptf")
    scale, zp = observers.qparams(spec, _stats(lo, hi), jnp.asarray(x))  # eager, as calibrate
    want = (1,) * (len(shape) - 1) + (shape[-1],)
    assert scale.shape == want
    assert zp.shape == want


def test_ptf_uses_the_running_statistics_for_the_coarse_scale():
    """The coarse scale and zp come from the merged statistics, not from x_last's range."""
    rng = np.random.default_rng(20)
    x_last = (rng.normal(size=(16, 4)) * [1.0, 0.3, 0.1, 2.0]).astype(np.float32)
    lo, hi = np.float32([[-6.0, -1.0, -0.5, -2.0]]), np.float32([[1.0, 2.0, 0.5, 8.0]])
    want_scale, want_zp, k, errors = _ref_ptf(lo, hi, x_last, bits=8, signed=False)
    _assert_clear_minimum(errors, k)
    spec = _spec(8, per_channel=True, observer="ptf")
    _check_qparams(_jit_qparams(spec, _stats(lo, hi), jnp.asarray(x_last)),
                   want_scale, want_zp, check_shapes=False)


def test_ptf_needs_per_channel():
    spec = _spec(8, observer="ptf")
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="per_channel"):
        observers.qparams(spec, _stats(np.zeros((1, 1)), np.ones((1, 1))), x)


def test_search_rows_keeps_whole_rows_without_repeats():
    x = np.random.default_rng(0).normal(size=(40, 30, 8)).astype(np.float32)
    rows = np.asarray(observers.search_rows(jnp.asarray(x), 800))  # 100 rows of 8 channels
    assert rows.shape == (100, 8)
    flat = x.reshape(-1, 8)
    found = [np.flatnonzero((flat == r).all(axis=1)) for r in rows]
    assert all(len(f) == 1 for f in found) and len({int(f[0]) for f in found}) == 100
    np.testing.assert_array_equal(rows, observers.search_rows(jnp.asarray(x), 800))
    assert observers.search_rows(jnp.asarray(x), None).shape == (1200, 8)


@pytest.mark.parametrize("observer, per_channel", [("omse", False), ("omse", True),
                                                   ("ptf", True)])
def test_capped_search_equals_the_full_search_on_the_sampled_rows(observer, per_channel):
    spec = qconfig.QuantSpec(bits=4, signed=False, symmetric=False, per_channel=per_channel,
                             observer=observer)
    x = jnp.asarray(np.random.default_rng(3).standard_t(3, size=(16, 50, 8)).astype(np.float32))
    stats = observers.batch_stats(spec, x)
    capped = observers.qparams(spec, stats, x, max_elements=400)
    sampled = observers.search_rows(x, 400)[None]
    full_on_rows = observers.qparams(spec, stats, sampled, max_elements=None)
    for a, b in zip(capped, full_on_rows):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
