"""Quantized matmuls on integer codes: the one arithmetic of fake-quant and int8 inference.

Fake quantization as usually written multiplies the dequantized values, (c_x - z_x) s_x
times c_w s_w, in float32: every product and partial sum is rounded, in an order that
depends on the compiler and the CPU, and on low-bit grids a rounding error of 1e-7 can move
a value across the next quantizer's rounding boundary. Those flips compound through the
layers, most on 4-bit grids (docs/results.md, "The int8 path against fake-quant"). Here the
dot runs on the
codes themselves, (c_x - z_x) . c_w, and the scales come after, s_x s_w per output channel:

* the codes' products and sums are integers, exact in float32 below 2^24 (|c_x - z_x| <=
  255, |c_w| <= 128: 4-bit layers always, 8-bit ones unless some 500 extreme products
  share a sign), so float32 and int8 x int8 -> int32 (`quant.integer`) give the same
  accumulator and, with the same scale expression, the same features bit for bit;
* the straight-through gradients are those of fake-quant: the input's where its code is
  not clipped, times the fake-quantized kernel, and the kernel's from the dequantized input.

A train step does not use this path (`QState.codes=False`): it would derive the frozen
kernels' codes every step, and its dequantized products have the same gradients.

Layers qualify (`fits`) where the kernel is quantized symmetric (zero point 0, <= 8 bits)
and the input per tensor (one scale and zero point factor out of the sum); per-channel
inputs (the `official` preset's) keep the dequantized form. The ViT patch embedding is the
same matmul over the image's patches (`patchify`, `patches`). The attention products
(q k^T, p v: `clip.model.Product`) whose operands are both quantized per tensor run on
codes the same way (`product`).
"""

import functools

import jax
import jax.numpy as jnp

from p4q_jax.quant import primitives
from p4q_jax.quant import sites

MAX_BITS = primitives.MAX_BITS


def per_tensor_act(qconfig, acts, kind, name):
    """Whether site `name`'s activation of `kind` is quantized on one integer grid (one
    scale and zero point for the tensor, <= 8 bits, calibrated)."""
    spec = qconfig.spec(kind, name)
    return (spec is not None and spec.bits <= MAX_BITS and not spec.per_channel
            and spec.observer != "log2" and name in acts)


def fits(qconfig, acts, name):
    """Whether the layer `name` runs in the code domain: a symmetric <= 8-bit kernel (per
    output channel or per tensor) and a per-tensor input."""
    w = qconfig.spec("weight", name)
    return (w is not None and w.bits <= MAX_BITS and w.symmetric
            and per_tensor_act(qconfig, acts, "input", name))


def patchify(conv):
    """Whether `conv` is a ViT's patch embedding: no padding, no bias, stride equal to the
    window (other convs keep the dequantized path: padding would make the zero-point term
    position-dependent)."""
    return (conv.padding == "VALID" and not conv.use_bias
            and tuple(conv.strides or ()) == tuple(conv.kernel_size))


def patches(x, kernel_size):
    """[B, H, W, C] -> [B, H / p, W / q, p q C]: the non-overlapping patches a stride-(p, q)
    conv reads, flattened in the order of its HWIO kernel's leading axes."""
    p, q = kernel_size
    b, h, w, c = x.shape
    x = x[:, : h // p * p, : w // q * q].reshape(b, h // p, p, w // q, q, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // q, p * q * c)


def _contract(a, b):
    """[..., K] x [K, N] at the default precision: codes of <= 8 bits are exact in bfloat16
    and TF32 too, so reduced-precision matmul units keep the sum exact."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def output_scale(x_scale, w_scale):
    """s_x s_w per output channel: the scale of an accumulator of codes. The int8 path
    applies the same expression, so both round alike."""
    return jnp.reshape(x_scale, ()) * jnp.reshape(w_scale, (-1,))


def _codes(x, x_scale, x_zero, w, w_scale, x_range, w_range):
    x_code = jnp.round(x / x_scale) + x_zero  # before clipping
    return x_code, jnp.clip(x_code, *x_range) - x_zero, jnp.clip(jnp.round(w / w_scale),
                                                                 *w_range)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _matmul(x, x_scale, x_zero, w, w_scale, x_range, w_range):
    _, xq, wq = _codes(x, x_scale, x_zero, w, w_scale, x_range, w_range)
    return _contract(xq, wq) * output_scale(x_scale, w_scale)


def _matmul_fwd(x, x_scale, x_zero, w, w_scale, x_range, w_range):
    x_code, xq, wq = _codes(x, x_scale, x_zero, w, w_scale, x_range, w_range)
    y = _contract(xq, wq) * output_scale(x_scale, w_scale)
    x_inside = (x_code >= x_range[0]) & (x_code <= x_range[1])
    return y, (xq, x_inside, w, x_scale, x_zero, w_scale)


def _matmul_bwd(x_range, w_range, res, g):
    del x_range, w_range
    xq, x_inside, w, x_scale, x_zero, w_scale = res
    batch_axes = tuple(range(g.ndim - 1))
    gx = jnp.einsum("...n,kn->...k", g, w)
    gw = jax.lax.dot_general(xq * x_scale, g, ((batch_axes, batch_axes), ((), ())))
    return (jnp.where(x_inside, gx, 0).astype(g.dtype), jnp.zeros_like(x_scale),
            jnp.zeros_like(x_zero), gw.astype(g.dtype), jnp.zeros_like(w_scale))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, x_params, x_fmt, w, w_params, w_fmt):
    """`fake_quant(x) @ w` ([..., K] x [K, N]) for a fake-quantized kernel `w` (as a QState
    holds it), computed on the codes (module doc).

    `x_params`, `w_params`: QParams, one scale and zero point for `x`; the symmetric
    kernel's scale per output channel ([1, N]) or per tensor. The gradients are those of
    `fake_quant(x) @ w`: straight through `x` where its code is not clipped, and `w`'s
    from the dequantized input; none for the scales. (The float kernel has the same codes,
    so the forward pass is the same for it.)"""
    x = x.astype(jnp.float32)
    w_scale = jnp.reshape(jnp.asarray(w_params.scale, jnp.float32), (1, -1))
    return _matmul(x, jnp.asarray(x_params.scale, jnp.float32).reshape(()),
                   jnp.asarray(x_params.zero_point, jnp.float32).reshape(()),
                   w.astype(jnp.float32).reshape(-1, w.shape[-1]), w_scale,
                   (x_fmt.qmin, x_fmt.qmax), (w_fmt.qmin, w_fmt.qmax))


def product_sites(qconfig, acts, module):
    """The two operand sites of a `clip.model.Product` where both are quantized per tensor
    (then it runs on codes), else None."""
    parent = sites.site_name(module).rsplit("/", 1)[0]
    names = [f"{parent}/{operand}" for operand in module.operands]
    return names if all(per_tensor_act(qconfig, acts, "attn", n) for n in names) else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(equation, a, a_scale, b, b_scale):
    # a = (c_a - z_a) s_a as fake-quant left it: a / s_a rounds back to c_a - z_a exactly.
    codes = jnp.einsum(equation, jnp.round(a / a_scale), jnp.round(b / b_scale),
                       preferred_element_type=jnp.float32)
    return codes * (a_scale * b_scale)


def _product_fwd(equation, a, a_scale, b, b_scale):
    return _product(equation, a, a_scale, b, b_scale), (a, a_scale, b, b_scale)


def _product_bwd(equation, res, g):
    a, a_scale, b, b_scale = res
    _, vjp = jax.vjp(functools.partial(jnp.einsum, equation), a, b)
    ga, gb = vjp(g)
    return ga, jnp.zeros_like(a_scale), gb, jnp.zeros_like(b_scale)


_product.defvjp(_product_fwd, _product_bwd)


def product(equation, a, a_params, b, b_params):
    """`einsum(equation, a, b)` of two fake-quantized per-tensor operands, computed on their
    codes (exact in float32 while the sums stay below 2^24: head dimensions and sequence
    lengths of CLIP's towers with <= 8-bit codes), scaled after. The gradient is the
    einsum's."""
    scale = lambda p: jnp.asarray(p.scale, jnp.float32).reshape(())
    return _product(equation, a.astype(jnp.float32), scale(a_params), b.astype(jnp.float32),
                    scale(b_params))
