"""QAT (LSQ): the learned-step quantizer against the paper's formula in numpy, the QAT train
step (every kernel and step learns, the loss falls, sharded = unsharded), exact resume and
the export's reload."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax.quant import lsq
from p4q_jax.quant import primitives


def _paper_lsq(x, s, z, w, qmin, qmax, n):
    """Esser et al. 2020, eq. 1-3, on the grid [Qn, Qp] = [qmin - z, qmax - z] of a fixed
    zero point z: the forward round(clip(x / s, Qn, Qp)) * s and the gradients of sum(w *
    x_hat) w.r.t. x (straight through inside) and s (-x/s + round(x/s) inside, Qn / Qp
    outside), the latter times g = 1 / sqrt(N * qmax). float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    v = x / s
    lo, hi = qmin - z, qmax - z
    y = np.round(np.clip(v, lo, hi)) * s
    inside = (v >= lo) & (v <= hi)
    gx = np.where(inside, w, 0.0)
    ds = np.where(v < lo, lo, np.where(v > hi, hi, -v + np.round(v)))
    g = 1.0 / np.sqrt(n * qmax)
    return y, gx, g * np.sum(w * ds)


def _lsq_grads(x, s, z, w, fmt, n):
    loss = lambda x, s: jnp.sum(lsq.fake_quant(x, s, z, fmt, per_step_elements=n) * w)
    y = lsq.fake_quant(jnp.asarray(x), jnp.float32(s), jnp.float32(z), fmt,
                       per_step_elements=n)
    gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.float32(s))
    return np.asarray(y), np.asarray(gx), float(gs)


@pytest.mark.parametrize(("bits", "signed", "z"), [(4, True, 0), (8, True, 0), (4, False, 3),
                                                   (8, False, 37), (2, False, 1)])
def test_lsq_matches_the_papers_gradient(bits, signed, z):
    """A kernel-like tensor (N = all its elements) and an activation batch (N = features per
    example), values on both sides of the grid; off-tie values (a tie rounds either way)."""
    fmt = primitives.IntFormat(bits=bits, signed=signed)
    s = 0.0625  # exact in binary: x / s and the grid ends are exact
    rng = np.random.default_rng(bits * 10 + z)
    codes = rng.integers(fmt.qmin - z - 4, fmt.qmax - z + 5, size=(4, 6, 5))
    frac = rng.uniform(-0.45, 0.45, size=codes.shape)
    x = ((codes + frac) * s).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    for n in (x.size, x[0].size):  # weight: all elements; activation: one example's
        y_ref, gx_ref, gs_ref = _paper_lsq(x, s, z, w, fmt.qmin, fmt.qmax, n)
        assert (gx_ref == 0).any() and (gx_ref != 0).any()  # clipped and inside both occur
        y, gx, gs = _lsq_grads(x, s, z, w, fmt, n)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(gx, gx_ref.astype(np.float32))
        np.testing.assert_allclose(gs, gs_ref, rtol=1e-5)


def test_lsq_features_per_example():
    """N_F: one example's elements per step (per tensor), per channel each channel's."""
    x = jnp.zeros((8, 5, 12))
    assert lsq.features_per_example(x, jnp.zeros((1, 1, 1))) == 60
    assert lsq.features_per_example(x, jnp.zeros((1, 1, 12))) == 5


def test_lsq_zero_point_gets_no_gradient():
    fmt = primitives.IntFormat(bits=4, signed=False)
    x = jnp.linspace(-2.0, 2.0, 33)
    gz = jax.grad(lambda z: jnp.sum(lsq.fake_quant(x, 0.1, z, fmt) ** 2))(jnp.float32(5.0))
    assert float(gz) == 0.0
