"""Integer inference: int8 x uint8 -> int32 matmuls (Qwix), with the scales applied after.

For each Dense whose kernel is quantized symmetric per output channel at 8 bits and
whose input is quantized per tensor (the `w8a8` preset), the input's int8 codes and the
kernel's are multiplied by `qwix.dot_general` with int32 accumulation, the zero point is
corrected in int32, and only then are the scales applied. That equals the fake-quant result up to
float rounding. The kernels' int8 codes are computed once (`integer_state`). Sites that
do not fit (the patch conv, per-channel activations, the attention tensors) keep the
fake-quant path of the QState, so an IntegerState can be used wherever a QState is.
"""

import contextlib

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import qwix

from p4q_jax.quant import primitives
from p4q_jax.quant import sites
from p4q_jax.quant import state as state_lib

INT_BITS = 8


def _fits(qstate, name):
    w = qstate.config.spec("weight", name)
    x = qstate.config.spec("input", name)
    return (w is not None and x is not None and w.bits == INT_BITS and x.bits == INT_BITS
            and w.symmetric and not x.per_channel and x.observer != "log2"
            and name in qstate.acts)


@flax.struct.dataclass
class IntegerState:
    """A QState plus int8 kernels (as `qwix.QArray`) for the Dense layers that fit."""

    qstate: state_lib.QState
    kernels: dict

    def quantized_params(self, params):
        return self.qstate.quantized_params(params)

    def _dense(self, module, x):
        name = sites.site_name(module)
        act = self.qstate.acts[name]
        fmt = self.qstate.config.spec("input", name).fmt
        codes = primitives.quantize(x.astype(jnp.float32), act.scale, act.zero_point, fmt)
        # uint8 codes and zero point shifted by -128 give the same product, and XLA's
        # int8 x int8 -> int32 dot is several times faster than uint8 x int8 on CPU.
        shift = 0 if fmt.signed else 2 ** (INT_BITS - 1)
        ones = (1,) * x.ndim
        lhs = qwix.QArray(qvalue=(codes - shift).astype(jnp.int8),
                          scale=jnp.reshape(act.scale, ones),
                          zero_point=jnp.reshape(act.zero_point - shift, ones).astype(jnp.int8))
        y = qwix.dot_general(lhs, self.kernels[name], (((x.ndim - 1,), (0,)), ((), ())))
        if module.use_bias:
            y = y + module.get_variable("params", "bias")
        return y.astype(module.dtype or x.dtype)

    @contextlib.contextmanager
    def intercept(self):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if (context.method_name == "__call__" and isinstance(module, nn.Dense)
                    and sites.site_name(module) in self.kernels):
                return self._dense(module, args[0])
            return next_fun(*args, **kwargs)

        # Outer interceptors run first: integer Dense layers never reach the fake-quant one.
        with nn.intercept_methods(interceptor), self.qstate.intercept():
            yield


def integer_state(qstate, params):
    """Computes the int8 kernel codes once -> an IntegerState (usable as `qstate=`)."""
    kernels = {}
    for name, kernel in sites.kernels(params).items():
        if kernel.ndim != 2 or not _fits(qstate, name):  # conv kernels stay fake-quant
            continue
        p = qstate.weights[name]
        fmt = qstate.config.spec("weight", name).fmt
        codes = primitives.quantize(kernel, p.scale, p.zero_point, fmt).astype(jnp.int8)
        kernels[name] = qwix.QArray(qvalue=codes, scale=p.scale.astype(jnp.float32))
    if not kernels:
        raise ValueError(f"config {qstate.config.name!r} has no Dense layer with 8-bit "
                         "per-channel kernels and 8-bit per-tensor inputs; nothing runs in int8")
    return IntegerState(qstate=qstate, kernels=jax.tree.map(jnp.asarray, kernels))
