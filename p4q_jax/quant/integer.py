"""Integer inference: int8 x int8 -> int32 products, with the scales applied after.

Codes of every format up to 8 bits fit an int8 container (4-bit codes included; unsigned
codes are shifted by -128 with their zero point, which leaves every product unchanged and
lets XLA use its int8 x int8 dot, several times faster than float32 on CPUs with AVX-512
VNNI). The products are those fake-quant computes on codes (`quant.matmul`), so both give
the same features bit for bit (while fake-quant's float32 sums of codes stay exact,
below 2^24):

* every Dense whose kernel is quantized symmetric (per output channel) and whose input is
  quantized per tensor: the int8 dot of the input's codes and the kernel's (a
  `qwix.QArray`, computed once by `integer_state`), minus the input's zero point times the
  kernel's column sums, also computed once (`qwix.dot_general` derives that term from the
  kernel on every call, converting all of it to int32 first: 4 bytes of scratch per weight
  in every forward);
* the patch embedding of a ViT (a stride-`patch` conv without padding) on the same
  conditions, as the same dot over the image's patches;
* the attention products q k^T and p v (`clip.model.Product`) where both operands' sites
  are quantized per tensor and `IntegerState.products` is on: their codes are read back
  from the fake-quantized float32 values (exact: |code - zero point| <= 255), multiplied in
  int32 with the zero-point terms expanded (Qwix allows a zero point on one operand only).
  Off by default on CPUs (`int8_products_pay`): XLA:CPU's batched int8 dots over the heads'
  small matrices are slower than its float32 ones on the same codes, so the products stay
  on fake-quant's float32 code path there.

Per-channel activations (the `official` preset) do not factor out of a contraction over
channels, so their layers keep the fake-quant path of the QState; an IntegerState can be
used wherever a QState is (inference only: no straight-through gradients).
"""

import contextlib
import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import qwix
from absl import logging

from p4q_jax.clip import model as model_lib
from p4q_jax.quant import matmul
from p4q_jax.quant import primitives
from p4q_jax.quant import sites
from p4q_jax.quant import state as state_lib

MAX_BITS = matmul.MAX_BITS
_SHIFT = 2 ** (MAX_BITS - 1)  # unsigned codes minus this fit int8


def _int8_codes(x, params, fmt):
    """float x -> (int8 codes, int8-shifted zero point) of `fmt` (<= 8 bits). Applied to a
    fake-quantized float32 tensor it gives back exactly the codes behind it."""
    codes = primitives.quantize(x.astype(jnp.float32), params.scale, params.zero_point, fmt)
    shift = 0 if fmt.signed else _SHIFT
    return (codes - shift).astype(jnp.int8), params.zero_point - shift


def _broadcast_to_output(x, labels, out):
    """`x` (axes `labels`) transposed and reshaped to broadcast against einsum output `out`."""
    order = "".join(c for c in out if c in labels)
    x = jnp.einsum(f"{labels}->{order}", x)
    return x.reshape([x.shape[order.index(c)] if c in labels else 1 for c in out])


def _integer_einsum(equation, a, za, b, zb):
    """sum (a - za)(b - zb) over the contracted labels, in int32 (a, b int8; za, zb scalars)."""
    inputs, out = equation.split("->")
    la, lb = inputs.split(",")
    summed = [c for c in la if c in lb and c not in out]
    n = math.prod(a.shape[la.index(c)] for c in summed)
    za, zb = jnp.asarray(za).astype(jnp.int32), jnp.asarray(zb).astype(jnp.int32)
    result = jnp.einsum(equation, a, b, preferred_element_type=jnp.int32)
    free_a, free_b = ("".join(c for c in l if c not in summed) for l in (la, lb))
    sum_a = jnp.einsum(f"{la}->{free_a}", a.astype(jnp.int32))
    sum_b = jnp.einsum(f"{lb}->{free_b}", b.astype(jnp.int32))
    return (result - za.reshape(()) * _broadcast_to_output(sum_b, free_b, out)
            - zb.reshape(()) * _broadcast_to_output(sum_a, free_a, out) + n * za * zb)


@flax.struct.dataclass
class IntegerState:
    """A QState plus int8 kernels (`qwix.QArray`) for the layers that fit (see module doc)."""

    qstate: state_lib.QState
    kernels: dict  # site -> qwix.QArray: int8 codes [K, N], float32 scale [1, N]
    sums: dict  # site -> int32 [N]: the kernel codes summed over K (the zero-point term)
    products: bool = flax.struct.field(pytree_node=False, default=True)  # attention on codes

    @property
    def config(self):
        return self.qstate.config

    def quantized_params(self, params):
        return self.qstate.quantized_params(params)

    def text_only(self, params):
        """See `QState.text_only`; the image tower's int8 kernels go too."""
        params, qstate = self.qstate.text_only(params)
        text = lambda d: {n: v for n, v in d.items() if not n.startswith("visual/")}
        return params, self.replace(qstate=qstate, kernels=text(self.kernels),
                                    sums=text(self.sums))

    def _codes(self, name, x):
        return _int8_codes(x, self.qstate.acts[name], self.config.spec("input", name).fmt)

    def _matmul(self, name, codes, zero_point):
        """codes [..., K] (int8, the input's zero point) x the int8 kernel [K, N], scaled:
        exact in int32 up to the scales."""
        kernel = self.kernels[name]
        acc = jax.lax.dot_general(codes, kernel.qvalue, (((codes.ndim - 1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        acc = acc - jnp.reshape(zero_point, ()).astype(jnp.int32) * self.sums[name]
        return acc.astype(jnp.float32) * matmul.output_scale(self.qstate.acts[name].scale,
                                                             kernel.scale)

    def _dense(self, module, x):
        name = sites.site_name(module)
        y = self._matmul(name, *self._codes(name, x))
        if module.use_bias:
            y = y + module.get_variable("params", "bias")
        return y.astype(module.dtype or x.dtype)

    def _conv(self, module, x):
        """The patch conv as what it is, a matmul over non-overlapping patches (XLA:CPU's
        integer convolution is far slower than its int8 dot)."""
        name = sites.site_name(module)
        codes, zero_point = self._codes(name, x)
        patches = matmul.patches(codes, module.kernel_size)
        return self._matmul(name, patches, zero_point).astype(module.dtype or x.dtype)

    def _product(self, module, a, b, names):
        (ca, za), (cb, zb) = (
            _int8_codes(x, self.qstate.acts[n], self.config.spec("attn", n).fmt)
            for x, n in zip((a, b), names))
        y = _integer_einsum(module.equation, ca, za, cb, zb)
        scale = self.qstate.acts[names[0]].scale * self.qstate.acts[names[1]].scale
        return (y * scale.reshape(())).astype(a.dtype)

    @contextlib.contextmanager
    def intercept(self):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__":
                name = sites.site_name(module)
                if isinstance(module, nn.Dense) and name in self.kernels:
                    return self._dense(module, args[0])
                if (isinstance(module, nn.Conv) and name in self.kernels
                        and matmul.patchify(module)):
                    return self._conv(module, args[0])
                if (self.products and isinstance(module, model_lib.Product)
                        and all(x.dtype == jnp.float32 for x in args[:2])
                        and (names := matmul.product_sites(self.config, self.qstate.acts,
                                                            module))):
                    return self._product(module, *args[:2], names)
            return next_fun(*args, **kwargs)

        # Outer interceptors run first: integer layers never reach the fake-quant one.
        with nn.intercept_methods(interceptor), self.qstate.intercept():
            yield


def integer_state(qstate, params, *, products=None):
    """Computes the int8 kernel codes once -> an IntegerState (usable as `qstate=`).

    `products`: the attention products on int8 codes too (None: where `int8_products_pay`).
    Raises ValueError when no layer fits (e.g. the `official` preset's per-channel inputs).
    """
    kernels = {}
    for name, kernel in sites.kernels(params).items():
        # Of the convs only the stem can be a patch embedding (checked again when it runs).
        if not (kernel.ndim == 2 or (kernel.ndim == 4 and name == "visual/conv1")):
            continue
        if not matmul.fits(qstate.config, qstate.acts, name):
            continue
        p = qstate.weights[name]
        fmt = qstate.config.spec("weight", name).fmt
        codes = primitives.quantize(kernel, p.scale, p.zero_point, fmt).astype(jnp.int8)
        scale = p.scale.astype(jnp.float32)
        if kernel.ndim == 4:  # HWIO -> [patch elements (kh, kw, c), out], as `_conv` reads it
            codes, scale = codes.reshape(-1, codes.shape[-1]), scale.reshape(1, -1)
        kernels[name] = qwix.QArray(qvalue=codes, scale=scale)
    if not kernels:
        raise ValueError(f"config {qstate.config.name!r} has no Dense layer with <= 8-bit "
                         "per-channel kernels and <= 8-bit per-tensor inputs; nothing runs "
                         "in int8")
    kernels = jax.tree.map(jnp.asarray, kernels)
    sums = {name: jnp.sum(k.qvalue.astype(jnp.int32), axis=0) for name, k in kernels.items()}
    if products is None:
        products = int8_products_pay()
    return IntegerState(qstate=qstate, kernels=kernels, sums=sums, products=products)


def int8_products_pay():
    """Whether the attention products gain from int8 codes: not on CPUs, where XLA's
    batched int8 dots over the heads' small matrices lose to float32 and drag the whole
    forward's speed-up down (measured on an AVX-512 VNNI CPU: docs/results.md,
    "Encoding speed, quantized relative to float32"); elsewhere on, where the int8 dot is
    native (not measured)."""
    return jax.devices()[0].platform != "cpu"


@functools.cache
def int8_dot_is_faster():
    """Whether this machine's int8 dot beats float32: GPUs and TPUs, and CPUs with
    AVX-512 VNNI or AMX (`/proc/cpuinfo` flags); -> (bool, reason)."""
    platform = jax.devices()[0].platform
    if platform != "cpu":
        return True, f"the {platform} runs int8 dots natively"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    for flag in ("amx_int8", "avx512_vnni"):
        if flag in flags:
            return True, f"the CPU has {flag}"
    return False, "the CPU has neither AVX-512 VNNI nor AMX (its int8 dot is not faster)"


def inference_state(qstate, params, integer=None):
    """The state inference runs on: an IntegerState where `integer` (None: where
    `int8_dot_is_faster()`) and some layer fits, else `qstate` itself. Logs the choice."""
    if qstate is None or isinstance(qstate, IntegerState):
        return qstate
    reason = f"quant.integer={integer}"
    if integer is None:
        integer, reason = int8_dot_is_faster()
    if not integer:
        logging.info("quantized inference in fake-quant float32: %s", reason)
        return qstate
    try:
        state = integer_state(qstate, params)
    except ValueError as e:
        logging.info("quantized inference in fake-quant float32: %s", e)
        return qstate
    logging.info("quantized inference in int8 for %d layers (%s)", len(state.kernels), reason)
    return state
