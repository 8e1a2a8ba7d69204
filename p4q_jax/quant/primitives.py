"""Fake-quantization primitives with straight-through gradients (`jax.custom_vjp`).

P4Q's prompts learn *through* the quantized text tower, so every quantizer here has a
gradient: the forward pass rounds and clips exactly as integer hardware would; the
backward pass lets the gradient through where the input lies inside the representable
range and zeroes it outside (the clipped straight-through estimator). Scales and zero
points are calibrated outside the VJP and passed in (they get no gradient), except in
`lsq_quant`, where they are learned (LSQ / LSQ+).

Scales and zero points have shapes that broadcast against the input: `()` per tensor,
e.g. `[1, out]` per output channel of a `[in, out]` kernel.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

MIN_BITS, MAX_BITS = 2, 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntFormat:
    """An integer grid: `bits` wide, signed or not. Static data (hashable)."""

    bits: int
    signed: bool

    def __post_init__(self):
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; expected an int in [{MIN_BITS}, {MAX_BITS}]")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


def _quantize(x, scale, zero_point, qmin, qmax):
    return jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)


def quantize(x, scale, zero_point, fmt: IntFormat):
    """Real values -> integer codes (as float, exactly integral) on `fmt`'s grid."""
    return _quantize(x, scale, zero_point, fmt.qmin, fmt.qmax)


def dequantize(q, scale, zero_point):
    return (q - zero_point) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, qmin, qmax):
    return dequantize(_quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def _fake_quant_fwd(x, scale, zero_point, qmin, qmax):
    code = jnp.round(x / scale) + zero_point  # before clipping
    inside = (code >= qmin) & (code <= qmax)
    y = dequantize(jnp.clip(code, qmin, qmax), scale, zero_point)
    return y, (inside, scale, zero_point)


def _fake_quant_bwd(qmin, qmax, res, g):
    del qmin, qmax
    inside, scale, zero_point = res
    return (jnp.where(inside, g, 0).astype(g.dtype), jnp.zeros_like(scale),
            jnp.zeros_like(zero_point))


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x, scale, zero_point, fmt: IntFormat):
    """Round-trips `x` through `fmt`'s integer grid; clipped straight-through gradient.

    The gradient is 1 where `x` rounds to a code inside [qmin, qmax] and 0 where it is
    clipped; scale and zero point get none (they are calibrated, not learned).
    """
    scale = jnp.asarray(scale, x.dtype)
    zero_point = jnp.asarray(zero_point, x.dtype)
    return _fake_quant(x, scale, zero_point, fmt.qmin, fmt.qmax)


def _log2_code(x):
    return jnp.round(-jnp.log2(x.astype(jnp.float32)))  # p = 0 gives +inf: flushed below


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log2_quant(x, bits):
    code = _log2_code(x)
    levels = 2**bits
    power = jnp.ldexp(jnp.ones_like(code), -jnp.clip(code, 0, levels - 1).astype(jnp.int32))
    return jnp.where(code >= levels, 0.0, power).astype(x.dtype)  # exact powers of two


def _log2_quant_fwd(x, bits):
    return _log2_quant(x, bits), _log2_code(x) < 2**bits


def _log2_quant_bwd(bits, inside, g):
    del bits
    return (jnp.where(inside, g, 0).astype(g.dtype),)


_log2_quant.defvjp(_log2_quant_fwd, _log2_quant_bwd)


def log2_quant(x, *, bits):
    """FQ-ViT's log2 quantizer for softmax probabilities in [0, 1]: p -> 2^-round(-log2 p).

    Codes run 0..2^bits - 1; probabilities below 2^-(2^bits - 0.5) become exactly 0.
    Straight-through gradient where the value is not flushed to zero.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected [{MIN_BITS}, {MAX_BITS}]")
    return _log2_quant(x, bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lsq(x, scale, offset, qmin, qmax, grad_scale):
    del grad_scale
    return jnp.clip(jnp.round((x - offset) / scale), qmin, qmax) * scale + offset


def _lsq_fwd(x, scale, offset, qmin, qmax, grad_scale):
    return _lsq(x, scale, offset, qmin, qmax, grad_scale), (x, scale, offset)


def _lsq_bwd(qmin, qmax, grad_scale, res, g):
    x, scale, offset = res
    v = (x - offset) / scale
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    # LSQ (Esser et al. 2020): d x_hat / d s = round(v) - v inside, qmin / qmax outside.
    ds = jnp.where(below, qmin, jnp.where(above, qmax, jnp.round(v) - v))
    # LSQ+ (Bhalgat et al. 2020): d x_hat / d beta = 0 inside, 1 outside.
    db = jnp.where(inside, 0.0, 1.0)

    def reduce_to(t, like):
        axes = tuple(i for i, n in enumerate(like.shape) if n == 1 and t.shape[i] != 1)
        return jnp.sum(t, axis=axes, keepdims=True).reshape(like.shape) if like.ndim else t.sum()

    gx = jnp.where(inside, g, 0.0)
    gs = reduce_to(g * ds, scale) * grad_scale
    gb = reduce_to(g * db, offset) * grad_scale
    return gx.astype(g.dtype), gs.astype(scale.dtype), gb.astype(offset.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quant(x, scale, offset, fmt: IntFormat, *, per_step_elements=None):
    """LSQ+ fake quantization with a learnable scale and offset (offset 0 gives LSQ).

    `scale` and `offset` broadcast against `x` (same rank, or scalars). Their gradients
    are scaled by 1 / sqrt(n * qmax) as in the LSQ paper, with n the number of
    elements sharing one scale (`per_step_elements`, inferred by default).
    """
    scale = jnp.asarray(scale, x.dtype)
    offset = jnp.asarray(offset, x.dtype)
    if scale.ndim not in (0, x.ndim) or offset.ndim not in (0, x.ndim):
        raise ValueError(f"scale {scale.shape} / offset {offset.shape} must be scalars or have "
                         f"the rank of x {x.shape}")
    n = per_step_elements or x.size // max(scale.size, 1)
    grad_scale = float(1.0 / (n * max(fmt.qmax, 1)) ** 0.5)
    return _lsq(x, scale, offset, fmt.qmin, fmt.qmax, grad_scale)
