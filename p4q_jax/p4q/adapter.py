"""P4Q's QAdapter: a small low-bit bottleneck on the quantized image feature.

`f -> ratio * fc2(relu(fc1(f))) + (1 - ratio) * f`, with fc1: d -> d / reduction and
fc2: d / reduction -> d (P4Q: reduction 4, ratio 0.2), 8-bit weights and inputs:

* Training (`train_apply`): both kernels are fake-quantized every step from the current
  weights (int8, symmetric, per output channel, MinMax) and both inputs from the current
  batch's range (uint8, asymmetric, per tensor), all with straight-through gradients.
* Evaluation / export: after training, `calibrate` observes the inputs on training
  features with the final weights (OMSE, like the towers), quantizes the kernels once,
  and the ranges stay frozen (`apply` with that QState).
This differs from the public code, which trains the adapter in float and observes it
during part of its last epoch while its weights still change.
"""

import jax
import flax.linen as nn

from p4q_jax.quant import calibration
from p4q_jax.quant import observers
from p4q_jax.quant import primitives
from p4q_jax.quant import qconfig as qconfig_lib
from p4q_jax.quant import sites

QCONFIG = qconfig_lib.QConfig(name="adapter8", rules=(
    qconfig_lib.Rule(kind="weight", pattern="^fc[12]$", spec=qconfig_lib.weight_spec(8)),
    qconfig_lib.Rule(kind="input", pattern="^fc[12]$", spec=qconfig_lib.act_spec(8)),
))


class QAdapter(nn.Module):
    reduction: int = 4
    ratio: float = 0.2

    @nn.compact
    def __call__(self, f):
        width = f.shape[-1]
        h = nn.relu(nn.Dense(width // self.reduction, name="fc1")(f))
        return self.ratio * nn.Dense(width, name="fc2")(h) + (1 - self.ratio) * f


def _dynamic_input(kind, name, x):
    spec = QCONFIG.spec(kind, name)
    if spec is None:
        return x
    stats = jax.tree.map(jax.lax.stop_gradient, observers.batch_stats(spec, x))
    scale, zero_point = observers.range_qparams(stats["lo"], stats["hi"], spec)
    return primitives.fake_quant(x, scale, zero_point, spec.fmt)


def fake_quant_kernels(params):
    """The adapter params with int8 fake-quantized kernels (per-channel MinMax, STE)."""
    quantized = {}
    for name, w in sites.kernels(params).items():
        spec = QCONFIG.spec("weight", name)
        stats = jax.tree.map(jax.lax.stop_gradient, observers.batch_stats(spec, w))
        scale, zero_point = observers.range_qparams(stats["lo"], stats["hi"], spec)
        quantized[name] = primitives.fake_quant(w, scale, zero_point, spec.fmt)
    return sites.replace_kernels(params, quantized)


def train_apply(adapter, params, features):
    """The adapter with 8-bit fake quantization from the current weights and batch (STE)."""
    with sites.intercept(_dynamic_input):
        return adapter.apply({"params": fake_quant_kernels(params)}, features)


def calibrate(adapter, params, feature_batches, *, search_rows="balanced"):
    """Frozen 8-bit ranges for evaluation, observed with the final weights -> QState.

    `search_rows`: "balanced" (every feature) or "last" (the final batch, the public code's
    way), see `quant.calibrate`."""
    return calibration.calibrate_module(adapter, params, QCONFIG, feature_batches,
                                        search_rows=search_rows)


def apply(adapter, params, features, qstate):
    """The calibrated (frozen) quantized adapter, for evaluation."""
    with qstate.intercept():
        return adapter.apply({"params": qstate.quantized_params(params)}, features)
