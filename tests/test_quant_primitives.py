"""Quantization primitives against a plain numpy reference written from FQ-ViT's formulas.

Every expected value here comes from `_ref_*` functions below (numpy, float32 where the
rounding matters), never from the code under test. Values that would sit exactly on a
rounding tie are avoided, except where a test is about the tie.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax.quant import primitives

# (bits, signed) -> (qmin, qmax), written out rather than computed.
GRIDS = {
    (2, True): (-2, 1), (2, False): (0, 3),
    (3, True): (-4, 3), (3, False): (0, 7),
    (4, True): (-8, 7), (4, False): (0, 15),
    (5, True): (-16, 15), (5, False): (0, 31),
    (6, True): (-32, 31), (6, False): (0, 63),
    (7, True): (-64, 63), (7, False): (0, 127),
    (8, True): (-128, 127), (8, False): (0, 255),
}
# (bits, signed, zero_point): the formats the fake-quant tests run on.
FORMATS = [(8, True, 0), (8, False, 37), (4, False, 3), (2, True, 0), (2, False, 1), (8, True, -5)]


def _jit_grad(f, argnums=0):
    """jax.grad under jit: one compilation per test instead of one per eager op (speed)."""
    return jax.jit(jax.grad(f, argnums=argnums))


def _fmt(bits, signed):
    return primitives.IntFormat(bits=bits, signed=signed)


def _ref_fake_quant(x, scale, zero_point, qmin, qmax):
    """FQ-ViT fake quantization in float32: returns (dequantized values, integer codes)."""
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point, np.float32)
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)  # np.round is half-to-even
    return ((q - zero_point) * scale).astype(np.float32), q


def _ref_inside(x, scale, zero_point, qmin, qmax):
    """Where the clipped STE passes the gradient: x/scale + zp rounds into [qmin, qmax]."""
    x = np.asarray(x, np.float32)
    r = np.round(x / np.float32(scale) + np.float32(zero_point))
    return (r >= qmin) & (r <= qmax)


# --- IntFormat ------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "signed"), sorted(GRIDS))
def test_int_format_grid(bits, signed):
    fmt = _fmt(bits, signed)
    assert (fmt.qmin, fmt.qmax) == GRIDS[bits, signed]
    assert fmt.qmax - fmt.qmin + 1 == 2**bits


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, 4.0, "8", None])
def test_int_format_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        primitives.IntFormat(bits=bits, signed=True)


# --- fake_quant: forward --------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "signed", "zero_point"), FORMATS)
def test_fake_quant_per_tensor_matches_reference(bits, signed, zero_point):
    qmin, qmax = GRIDS[bits, signed]
    scale = np.float32(0.0371)
    rng = np.random.default_rng(bits * 10 + signed)
    # Spans the grid and well past both ends, so both rounding and clipping are exercised.
    margin = max(4, (qmax - qmin) // 4)
    lo, hi = (qmin - zero_point - margin) * scale, (qmax - zero_point + margin) * scale
    x = rng.uniform(lo, hi, size=(4, 33)).astype(np.float32)
    want, q = _ref_fake_quant(x, scale, zero_point, qmin, qmax)
    assert (q == qmin).any() and (q == qmax).any()  # the data reach the clipping regions
    got = primitives.fake_quant(jnp.asarray(x), scale, zero_point, _fmt(bits, signed))
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_fake_quant_per_channel_matches_reference():
    fmt, (qmin, qmax) = _fmt(8, False), GRIDS[8, False]
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(5, 6)) * np.arange(1, 7)).astype(np.float32)
    scale = np.array([[0.01, 0.02, 0.005, 0.03, 0.011, 0.05]], np.float32)  # [1, C]
    zero_point = np.array([[128, 0, 255, 100, 7, 60]], np.float32)
    want, _ = _ref_fake_quant(x, scale, zero_point, qmin, qmax)
    got = primitives.fake_quant(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(zero_point), fmt)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_fake_quant_per_channel_conv_kernel():
    """A conv kernel [kh, kw, in, out], one scale per output channel (shape [1, 1, 1, out])."""
    fmt, (qmin, qmax) = _fmt(4, True), GRIDS[4, True]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    scale = rng.uniform(0.05, 0.4, size=(1, 1, 1, 8)).astype(np.float32)
    want, _ = _ref_fake_quant(x, scale, 0.0, qmin, qmax)
    got = primitives.fake_quant(jnp.asarray(x), jnp.asarray(scale), jnp.zeros((1, 1, 1, 8)), fmt)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    # A different scale per channel must give a different result from a shared scale.
    shared, _ = _ref_fake_quant(x, scale[..., :1], 0.0, qmin, qmax)
    assert not np.allclose(np.asarray(got), shared)


@pytest.mark.parametrize(("bits", "signed", "zero_point"), FORMATS)
def test_fake_quant_outputs_lie_on_the_grid(bits, signed, zero_point):
    """With a power-of-two scale, y / scale + zp is exact: it must be an integer in range."""
    qmin, qmax = GRIDS[bits, signed]
    scale = np.float32(2.0**-3)
    rng = np.random.default_rng(3)
    x = rng.uniform((qmin - zero_point - 3) * scale, (qmax - zero_point + 3) * scale,
                    size=8192).astype(np.float32)
    got = np.asarray(primitives.fake_quant(jnp.asarray(x), scale, zero_point, _fmt(bits, signed)))
    q = got / scale + zero_point
    np.testing.assert_array_equal(q, np.round(q))
    assert q.min() >= qmin and q.max() <= qmax
    _, want_q = _ref_fake_quant(x, scale, zero_point, qmin, qmax)
    np.testing.assert_array_equal(q, want_q)
    assert set(np.unique(q)) == set(range(qmin, qmax + 1))  # every code is reachable


def test_fake_quant_rounds_ties_to_even():
    """Exact .5 multiples of the scale round half-to-even, as np.round / jnp.round do."""
    fmt = _fmt(8, True)
    scale = np.float32(0.5)
    x = np.array([0.25, 0.75, -0.25, -0.75, 1.25, 2.25], np.float32)  # x/scale = k + .5
    got = np.asarray(primitives.fake_quant(jnp.asarray(x), scale, 0.0, fmt))
    np.testing.assert_array_equal(got, np.array([0.0, 1.0, 0.0, -1.0, 1.0, 2.0], np.float32))


def test_fake_quant_under_jit():
    fmt, (qmin, qmax) = _fmt(4, False), GRIDS[4, False]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    scale, zero_point = np.float32(0.173), np.float32(6)
    want, _ = _ref_fake_quant(x, scale, zero_point, qmin, qmax)
    jitted = jax.jit(primitives.fake_quant, static_argnames="fmt")
    got = jitted(jnp.asarray(x), jnp.float32(scale), jnp.float32(zero_point), fmt=fmt)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    grad = _jit_grad(lambda v: primitives.fake_quant(v, scale, zero_point, fmt).sum())
    np.testing.assert_array_equal(np.asarray(grad(jnp.asarray(x))),
                                  _ref_inside(x, scale, zero_point, qmin, qmax).astype(np.float32))


def test_fake_quant_bfloat16():
    """bf16 in, bf16 out. Inputs (4m + 1) / 32 are exact in bf16 and the scale is a power of
    two, so the bf16 arithmetic is exact (x / scale = m / 2 + 1 / 8: never a tie) and must
    match the float32 reference."""
    fmt, (qmin, qmax) = _fmt(4, True), GRIDS[4, True]
    rng = np.random.default_rng(5)
    x32 = ((4 * rng.integers(-63, 64, size=(4, 64)) + 1) / 32).astype(np.float32)
    x = jnp.asarray(x32, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(x, np.float32), x32)  # exactly representable
    scale = 2.0**-2
    got = primitives.fake_quant(x, scale, 0.0, fmt)
    assert got.dtype == jnp.bfloat16
    want, q = _ref_fake_quant(x32, scale, 0.0, qmin, qmax)
    assert (q == qmin).any() and (q == qmax).any()
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    grad = _jit_grad(
        lambda v: primitives.fake_quant(v, scale, 0.0, fmt).astype(jnp.float32).sum())(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad, np.float32),
                                  _ref_inside(x32, scale, 0.0, qmin, qmax).astype(np.float32))


# --- fake_quant: gradient -------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "signed", "zero_point"), FORMATS)
def test_fake_quant_ste_gradient_is_one_inside_zero_outside(bits, signed, zero_point):
    qmin, qmax = GRIDS[bits, signed]
    scale = np.float32(0.25)
    # Targets for x / scale + zp; the ones at +-0.4 round onto the grid, +-0.6 past it.
    v = np.array([qmin - 7, qmin - 0.6, qmin - 0.4, qmin, (qmin + qmax) / 2 + 0.2, qmax - 0.3,
                  qmax, qmax + 0.4, qmax + 0.6, qmax + 9], np.float64)
    want = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    x = ((v - zero_point) * scale).astype(np.float32)
    # In float32 the targets are hit to within rounding, far from the +-0.5 edges.
    np.testing.assert_allclose(x / scale + np.float32(zero_point), v, rtol=0, atol=1e-3)
    fmt = _fmt(bits, signed)
    grad = _jit_grad(lambda t: primitives.fake_quant(t, scale, zero_point, fmt).sum())(
        jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), want)
    # And the chain rule passes an upstream cotangent through unchanged (or zeroes it).
    w = np.linspace(-2, 3, v.size).astype(np.float32)
    grad_w = _jit_grad(lambda t: (primitives.fake_quant(t, scale, zero_point, fmt) * w).sum())(
        jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad_w), want * w)


@pytest.mark.parametrize(("bits", "signed"), [(8, True), (8, False), (4, False), (2, True)])
def test_fake_quant_ste_gradient_at_the_half_way_ties(bits, signed):
    """At x/scale + zp = qmax + 0.5 the value rounds (half-to-even, qmax is odd) to qmax + 1,
    outside the grid: gradient 0. At qmin - 0.5 it rounds to qmin (even), inside: gradient 1."""
    qmin, qmax = GRIDS[bits, signed]
    scale = np.float32(0.5)
    v = np.array([qmin - 0.5, qmax + 0.5], np.float32)
    assert np.round(v[0]) == qmin and np.round(v[1]) == qmax + 1
    x = v * scale
    fmt = _fmt(bits, signed)
    y = primitives.fake_quant(jnp.asarray(x), scale, 0.0, fmt)
    np.testing.assert_array_equal(np.asarray(y), np.array([qmin, qmax], np.float32) * scale)
    grad = _jit_grad(lambda t: primitives.fake_quant(t, scale, 0.0, fmt).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), np.array([1.0, 0.0], np.float32))


def test_fake_quant_gradient_random_per_channel():
    fmt, (qmin, qmax) = _fmt(4, False), GRIDS[4, False]
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 5)).astype(np.float32) * 2
    scale = rng.uniform(0.05, 0.3, size=(1, 5)).astype(np.float32)
    zero_point = np.array([[0, 3, 8, 15, 1]], np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    inside = _ref_inside(x, scale, zero_point, qmin, qmax)
    assert inside.any() and not inside.all()
    grad = _jit_grad(lambda t: (primitives.fake_quant(t, scale, zero_point, fmt) * w).sum())(
        jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), np.where(inside, w, 0))


def test_fake_quant_scale_and_zero_point_get_no_gradient():
    fmt = _fmt(8, False)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))

    def loss(scale, zero_point):
        return (primitives.fake_quant(x, scale, zero_point, fmt) ** 2).sum()

    g_scale, g_zp = _jit_grad(loss, argnums=(0, 1))(jnp.float32(0.02), jnp.float32(120.0))
    assert float(g_scale) == 0.0 and float(g_zp) == 0.0
    g_scale, g_zp = _jit_grad(loss, argnums=(0, 1))(jnp.full((1, 4), 0.02), jnp.full((1, 4), 120.0))
    assert g_scale.shape == (1, 4) and g_zp.shape == (1, 4)
    np.testing.assert_array_equal(np.asarray(g_scale), 0.0)
    np.testing.assert_array_equal(np.asarray(g_zp), 0.0)


# --- log2_quant -----------------------------------------------------------------------------


def _ref_log2_quant(p, bits):
    """FQ-ViT's log2 quantizer: code = round(-log2 p); 0 when code >= 2^bits, else
    2^-clip(code, 0, 2^bits - 1). Returns (values, kept) where kept = not flushed to 0."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        code = np.round(-np.log2(p))  # -log2(0) = inf: flushed
    kept = code < 2**bits
    values = np.where(kept, np.exp2(-np.clip(code, 0, 2**bits - 1)), 0.0)
    return values.astype(np.float32), kept


def _log2_test_probabilities(bits, rng):
    """Probabilities spread over the codes of `bits` and beyond (normal float32 only), away
    from the rounding ties of -log2 p, plus the ends p = 1 and p = 0.5."""
    top = min(2**bits + 4, 120)
    e = rng.uniform(0, top, size=400)
    e = e[np.abs(e - np.floor(e) - 0.5) > 1e-3]
    return np.concatenate([[1.0, 0.5, 0.75, 0.3], np.exp2(-e)]).astype(np.float32)


@pytest.mark.parametrize("bits", range(2, 9))
def test_log2_quant_matches_reference(bits):
    p = _log2_test_probabilities(bits, np.random.default_rng(bits))
    want, kept = _ref_log2_quant(p, bits)
    if bits <= 6:
        assert not kept.all()  # some probabilities are flushed to zero
    got = primitives.log2_quant(jnp.asarray(p), bits=bits)
    assert got.dtype == jnp.float32
    # A wrong code is off by a factor of 2 or more; exactness is its own test below.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=0)
    grad = _jit_grad(lambda t: primitives.log2_quant(t, bits=bits).sum())(jnp.asarray(p))
    np.testing.assert_array_equal(np.asarray(grad), kept.astype(np.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_log2_quant_outputs_are_exact_powers_of_two(bits):
    """The output is 2^-code exactly (a bit shift in integer hardware), not an approximation."""
    p = _log2_test_probabilities(bits, np.random.default_rng(bits + 20))
    want, kept = _ref_log2_quant(p, bits)
    got = np.asarray(primitives.log2_quant(jnp.asarray(p), bits=bits))
    mantissa, _ = np.frexp(got[kept])
    np.testing.assert_array_equal(mantissa, 0.5)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", range(2, 9))
def test_log2_quant_zero_probability_is_zero_with_no_gradient(bits):
    """p = 0: -log2 p = inf >= 2^bits, so the output is exactly 0 and the gradient 0."""
    p = np.array([0.0, 1.0, 0.0], np.float32)
    want, kept = _ref_log2_quant(p, bits)
    np.testing.assert_array_equal(want, [0.0, 1.0, 0.0])
    got = primitives.log2_quant(jnp.asarray(p), bits=bits)
    np.testing.assert_array_equal(np.asarray(got), want)
    grad = _jit_grad(lambda t: primitives.log2_quant(t, bits=bits).sum())(jnp.asarray(p))
    np.testing.assert_array_equal(np.asarray(grad), kept.astype(np.float32))


def test_log2_quant_softmax_probabilities_4bit():
    """A realistic case: a softmax row, 4-bit codes 0..15, tiny probabilities become 0."""
    logits = np.array([5.0, 3.1, 0.2, -1.7, -6.3, -9.9, -14.2], np.float32)
    p = np.exp(logits - logits.max())
    p = (p / p.sum()).astype(np.float32)
    e = -np.log2(p.astype(np.float64))
    assert np.all(np.abs(e - np.floor(e) - 0.5) > 1e-3)  # no rounding ties
    want, kept = _ref_log2_quant(p, 4)
    assert kept.any() and not kept.all()
    got = primitives.log2_quant(jnp.asarray(p), bits=4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits", [0, 1, 9])
def test_log2_quant_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        primitives.log2_quant(jnp.ones((3,)), bits=bits)


# --- lsq_quant (LSQ+) -----------------------------------------------------------------------


def _ref_lsq(x, scale, offset, w, qmin, qmax):
    """LSQ+ forward and the gradients of sum(y * w) w.r.t. (x, scale, offset).

    Returns (y, gx, gscale, goffset, tolerance for the scale/offset gradients). The scale and
    offset gradients are sums over the elements sharing a scale, scaled by 1/sqrt(n qmax).
    """
    x, scale, offset = (np.asarray(a, np.float32) for a in (x, scale, offset))
    w = np.asarray(w, np.float32)
    v = (x - offset) / scale
    y = (np.clip(np.round(v), qmin, qmax) * scale + offset).astype(np.float32)
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    gx = np.where(inside, w, 0).astype(np.float32)
    ds = np.where(below, qmin, np.where(above, qmax, np.round(v) - v)).astype(np.float64)
    db = np.where(inside, 0.0, 1.0)
    n = x.size / scale.size
    g = 1.0 / np.sqrt(n * qmax)
    # Axes reduced: those where scale broadcasts (all of them for a scalar scale).
    axes = tuple(i for i in range(x.ndim) if scale.ndim == 0 or scale.shape[i] == 1)
    w64 = w.astype(np.float64)
    gs = g * np.sum(w64 * ds, axis=axes, keepdims=scale.ndim > 0)
    gb = g * np.sum(w64 * db, axis=axes, keepdims=scale.ndim > 0)
    # float32 sums in another order: allow ~1e-6 of the sum of magnitudes.
    tol = 1e-6 * g * max(np.sum(np.abs(w64 * ds)), np.sum(np.abs(w64 * db)), 1.0)
    return y, gx, gs.astype(np.float32), gb.astype(np.float32), tol


def _check_lsq(x, scale, offset, bits, signed, seed):
    qmin, qmax = GRIDS[bits, signed]
    w = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    y_ref, gx_ref, gs_ref, gb_ref, tol = _ref_lsq(x, scale, offset, w, qmin, qmax)
    fmt = _fmt(bits, signed)

    def loss(x, scale, offset):
        return (primitives.lsq_quant(x, scale, offset, fmt) * w).sum()

    args = tuple(jnp.asarray(a, jnp.float32) for a in (x, scale, offset))
    y = primitives.lsq_quant(*args, fmt)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-6, atol=1e-6)
    gx, gs, gb = _jit_grad(loss, argnums=(0, 1, 2))(*args)
    np.testing.assert_array_equal(np.asarray(gx), gx_ref)
    assert gs.shape == np.shape(scale) and gb.shape == np.shape(offset)
    np.testing.assert_allclose(np.asarray(gs), gs_ref, rtol=1e-6, atol=tol)
    np.testing.assert_allclose(np.asarray(gb), gb_ref, rtol=1e-6, atol=tol)
    return gx_ref


@pytest.mark.parametrize(("bits", "signed"), [(8, True), (8, False), (4, False), (2, True)])
def test_lsq_quant_per_tensor(bits, signed):
    qmin, qmax = GRIDS[bits, signed]
    scale, offset = np.float32(0.07), np.float32(-0.3)
    rng = np.random.default_rng(bits + 100 * signed)
    x = rng.uniform((qmin - 5) * scale + offset, (qmax + 5) * scale + offset,
                    size=(6, 10)).astype(np.float32)
    gx = _check_lsq(x, scale, offset, bits, signed, seed=8)
    assert (gx == 0).any()  # some values are clipped, on one side at least


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (4, True)])
def test_lsq_quant_per_channel(bits, signed):
    qmin, qmax = GRIDS[bits, signed]
    rng = np.random.default_rng(9)
    scale = np.array([[0.02, 0.1, 0.05, 0.3]], np.float32)  # [1, C]
    offset = np.array([[0.0, -0.5, 0.2, 1.0]], np.float32)
    v = rng.uniform(qmin - 4, qmax + 4, size=(12, 4)).astype(np.float32)
    x = (v * scale + offset).astype(np.float32)
    _check_lsq(x, scale, offset, bits, signed, seed=10)


def test_lsq_quant_gradient_scale_uses_elements_per_scale():
    """Per-tensor n = x.size, per-channel n = x.size / C: g differs by sqrt(C)."""
    fmt, qmax = _fmt(4, False), GRIDS[4, False][1]
    x = jnp.asarray(np.full((8, 4), 100.0, np.float32))  # all clipped above: ds = qmax, db = 1

    def grads(scale, offset):
        return _jit_grad(lambda s, b: primitives.lsq_quant(x, s, b, fmt).sum(), argnums=(0, 1))(
            scale, offset)

    gs, gb = grads(jnp.float32(1.0), jnp.float32(0.0))
    np.testing.assert_allclose(float(gs), 32 * qmax / np.sqrt(32 * qmax), rtol=1e-6)
    np.testing.assert_allclose(float(gb), 32 / np.sqrt(32 * qmax), rtol=1e-6)
    gs, gb = grads(jnp.ones((1, 4)), jnp.zeros((1, 4)))
    np.testing.assert_allclose(np.asarray(gs), np.full((1, 4), 8 * qmax / np.sqrt(8 * qmax)),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gb), np.full((1, 4), 8 / np.sqrt(8 * qmax)), rtol=1e-6)


def test_lsq_quant_boundaries_are_inside():
    """v = qmin and v = qmax exactly are inside (dx = 1, dscale = round(v) - v = 0, doffset = 0);
    a quarter step past either end is outside (dx = 0, dscale = qmin / qmax, doffset = 1)."""
    qmin, qmax = GRIDS[4, True]
    v = np.array([qmin - 0.25, qmin, qmax, qmax + 0.25], np.float32)
    x = v * np.float32(0.5)  # exact
    _check_lsq(x, np.float32(0.5), np.float32(0.0), 4, True, seed=11)
    fmt = _fmt(4, True)
    gx, gs, gb = _jit_grad(lambda *a: primitives.lsq_quant(*a, fmt).sum(), argnums=(0, 1, 2))(
        jnp.asarray(x), jnp.float32(0.5), jnp.float32(0.0))
    np.testing.assert_array_equal(np.asarray(gx), [0.0, 1.0, 1.0, 0.0])
    g = 1 / np.sqrt(4 * qmax)
    np.testing.assert_allclose(float(gs), (qmin + qmax) * g, rtol=1e-6)
    np.testing.assert_allclose(float(gb), 2 * g, rtol=1e-6)
