"""Code-domain quantized matmuls (`quant.matmul`) against numpy: exact integer sums times the
scales, bit for bit; straight-through gradients equal to fake-quant's (the dequantized
values multiplied, written here from `primitives.fake_quant`, not from the code under test).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax.quant import matmul
from p4q_jax.quant import primitives
from p4q_jax.quant import state as state_lib

U4, U8 = primitives.IntFormat(bits=4, signed=False), primitives.IntFormat(bits=8, signed=False)
I4, I8 = primitives.IntFormat(bits=4, signed=True), primitives.IntFormat(bits=8, signed=True)


def _operands(seed, k=96, n=24, x_fmt=U8, w_fmt=I8):
    """x [2, 5, K] (some values beyond the grid's ends), w [K, N], their QParams."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 5, k)).astype(np.float32)
    w = (rng.normal(size=(k, n)) * 0.05).astype(np.float32)
    x_scale, x_zero = np.float32(3.0 / (x_fmt.qmax - x_fmt.qmin)), np.float32(
        (x_fmt.qmax + x_fmt.qmin + 1) // 2)
    w_scale = (np.abs(w).max(0, keepdims=True) / w_fmt.qmax).astype(np.float32)
    w_scale[0, :3] *= 0.8  # a few channels clip at both ends
    return (x, state_lib.QParams(x_scale, x_zero), w,
            state_lib.QParams(w_scale, np.zeros_like(w_scale)))


def _codes(v, scale, zero, fmt):
    """numpy: codes on `fmt`'s grid (float32 division and rounding, ties to even)."""
    return np.clip(np.round(np.float32(v) / scale) + zero, fmt.qmin, fmt.qmax)


@pytest.mark.parametrize("x_fmt,w_fmt", [(U8, I8), (U4, I4), (U8, I4)])
def test_forward_is_the_exact_code_sum_times_the_scales(x_fmt, w_fmt):
    x, xp, w, wp = _operands(0, x_fmt=x_fmt, w_fmt=w_fmt)
    got = np.asarray(jax.jit(matmul.matmul, static_argnums=(2, 5))(x, xp, x_fmt, w, wp, w_fmt))
    xc = _codes(x, xp.scale, xp.zero_point, x_fmt) - xp.zero_point
    wc = _codes(w, wp.scale, 0, w_fmt)
    exact = np.einsum("bsk,kn->bsn", xc.astype(np.int64), wc.astype(np.int64))
    assert np.abs(exact).max() < 2**24
    expected = exact.astype(np.float32) * (np.float32(xp.scale) * wp.scale.reshape(-1))
    np.testing.assert_array_equal(got, expected)
    dequantized = np.einsum("bsk,kn->bsn", xc * np.float64(xp.scale), wc * np.float64(wp.scale))
    np.testing.assert_allclose(got, dequantized, rtol=1e-5, atol=1e-6)


def _fake_quant_matmul(x, xp, x_fmt, w_fq, wp, w_fmt):
    del wp, w_fmt
    return primitives.fake_quant(x, xp.scale, xp.zero_point, x_fmt) @ w_fq


@pytest.mark.parametrize("x_fmt,w_fmt", [(U8, I8), (U4, I4)])
def test_gradients_are_fake_quants_straight_through_ones(x_fmt, w_fmt):
    """Through the fake-quantized kernel (what a QState holds): the input's gradient where
    its code is not clipped, the kernel's from the dequantized input."""
    x, xp, w, wp = _operands(1, x_fmt=x_fmt, w_fmt=w_fmt)
    w_fq = primitives.fake_quant(w, wp.scale, wp.zero_point, w_fmt)
    r = np.random.default_rng(2).normal(size=(2, 5, w.shape[1])).astype(np.float32)

    def grads(f):
        loss = lambda x, w: jnp.sum(f(x, xp, x_fmt, w, wp, w_fmt) * r)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w_fq)

    (gx, gw), (rx, rw) = grads(matmul.matmul), grads(_fake_quant_matmul)
    clipped = (_codes(x, xp.scale, xp.zero_point, x_fmt) != np.round(x / xp.scale)
               + xp.zero_point)
    assert clipped.any() and not clipped.all()
    assert np.all(np.asarray(gx)[clipped] == 0)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6 * np.abs(rx).max())
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-6 * np.abs(rw).max())


def test_a_fake_quantized_kernel_has_the_codes_of_its_float_kernel():
    x, xp, w, wp = _operands(3, x_fmt=U4, w_fmt=I4)
    w_fq = primitives.fake_quant(w, wp.scale, wp.zero_point, I4)
    np.testing.assert_array_equal(matmul.matmul(x, xp, U4, w, wp, I4),
                                  matmul.matmul(x, xp, U4, w_fq, wp, I4))


@pytest.mark.parametrize("equation,shapes", [
    ("bqhd,bkhd->bhqk", ((2, 7, 3, 64), (2, 7, 3, 64))),
    ("bhqk,bkhd->bqhd", ((2, 3, 7, 7), (2, 7, 3, 64)))])
def test_product_of_fake_quantized_operands(equation, shapes):
    rng = np.random.default_rng(4)
    operands, exact_codes = [], []
    for i, shape in enumerate(shapes):
        scale, zero = np.float32(0.037 + 0.01 * i), np.float32(100 + 20 * i)
        v = rng.normal(size=shape).astype(np.float32) * 2
        codes = _codes(v, scale, zero, U8) - zero
        operands.append((jnp.asarray(primitives.fake_quant(v, scale, zero, U8)),
                         state_lib.QParams(scale, zero)))
        exact_codes.append(codes.astype(np.int64))
    (a, pa), (b, pb) = operands
    got = jax.jit(matmul.product, static_argnums=0)(equation, a, pa, b, pb)
    exact = np.einsum(equation, *exact_codes)
    np.testing.assert_array_equal(
        np.asarray(got), exact.astype(np.float32) * (pa.scale * pb.scale))
    r = rng.normal(size=exact.shape).astype(np.float32)
    ga, gb = jax.grad(lambda a, b: jnp.sum(matmul.product(equation, a, pa, b, pb) * r),
                      argnums=(0, 1))(a, b)
    ra, rb = jax.grad(lambda a, b: jnp.sum(jnp.einsum(equation, a, b) * r),
                      argnums=(0, 1))(a, b)
    np.testing.assert_allclose(ga, ra, rtol=1e-6)
    np.testing.assert_allclose(gb, rb, rtol=1e-6)
