"""Learned step sizes (LSQ, Esser et al. 2020) for every quantized site of CLIP: QAT's quantizer.

`LSQState` is the trainable counterpart of the calibrated `QState`: the same sites, formats
and zero points, but the scales are leaves that receive gradients and the kernels are
fake-quantized from the (trainable) FP kernels in every forward pass instead of once.
It offers the two methods `clip.encode.apply` relies on (`quantized_params`, `intercept`),
so the towers run through it unchanged.

The quantizer of one site, with step s (learned) and zero point z (from calibration, fixed):

    forward   x_hat = (clip(round(x / s) + z, qmin, qmax) - z) * s
    backward  d x_hat / d x = 1 inside the grid, 0 outside (clipped straight-through);
              d x_hat / d s = round(x / s) - x / s inside, Qn = qmin - z below, Qp = qmax - z
              above, and the step's gradient is multiplied by g = 1 / sqrt(N * fmt.qmax).

The zero point stays fixed (an integer, as the integer export and the code-domain matmuls
need): the gradient above is the paper's for the grid [qmin - z, qmax - z]. It is
`primitives.lsq_quant` with the offset -z * s (whose own gradient, times -z, gives the
Qn / Qp terms), so there is one LSQ backward pass. N, the elements one step serves: for a
kernel, its elements per step (the paper's N_W per tensor; per output channel, the
channel's fan-in, whose gradients that step's sum adds up); for an activation, the features
per example (the paper's N_F; per channel, the features per example of that channel).

A step must stay positive to define a grid, and the paper leaves it unconstrained. Under
Adam, whose update has the size of the learning rate whatever the step's own size, a small
8-bit step can cross zero (the w8a8 methods run did, at a text MLP kernel). After every
update the steps are projected back onto [MIN_STEP_FRACTION x the calibrated step, inf)
(`keep_positive`); a step above that bound is left bit-for-bit as the update made it.
"""

import contextlib

import flax.struct
import jax
import jax.numpy as jnp

from p4q_jax.quant import primitives
from p4q_jax.quant import qconfig as qconfig_lib
from p4q_jax.quant import sites
from p4q_jax.quant import state as state_lib


def fake_quant(x, scale, zero_point, fmt: primitives.IntFormat, *, per_step_elements=None):
    """`x` through `fmt`'s grid with a learned `scale` and a fixed integer `zero_point` (see
    the module docstring); `per_step_elements` is N of g = 1 / sqrt(N * qmax) (default: the
    elements of `x` per scale)."""
    scale = jnp.asarray(scale, x.dtype)
    zero_point = jax.lax.stop_gradient(jnp.asarray(zero_point, x.dtype))
    return primitives.lsq_quant(x, scale, -zero_point * scale, fmt,
                                per_step_elements=per_step_elements)


def features_per_example(x, scale):
    """The paper's N_F for an activation [B, ...] whose step has `scale`'s shape: the
    elements of one example that share one step."""
    return max(x.size // (x.shape[0] * max(jnp.size(scale), 1)), 1)


@flax.struct.dataclass
class LSQState:
    """Learned steps of every quantized site (QAT): `acts` / `weights` map a site to its
    QParams (scale: learned; zero point: from calibration, fixed)."""

    config: qconfig_lib.QConfig = flax.struct.field(pytree_node=False)
    acts: dict
    weights: dict

    def kernel(self, name, kernel):
        """A kernel fake-quantized with its site's learned step."""
        p = self.weights[name]
        return fake_quant(kernel, p.scale, p.zero_point, self.config.spec("weight", name).fmt)

    def quantized_params(self, params):
        """`params` with every quantized kernel fake-quantized from its FP value."""
        kernels = sites.kernels(params)
        return sites.replace_kernels(
            params, {name: self.kernel(name, kernels[name]) for name in self.weights})

    def handler(self, kind, name, x):
        spec = self.config.spec(kind, name)
        if spec is None:
            return x
        if spec.observer == "log2":  # a fixed grid of powers of two: no step to learn
            return primitives.log2_quant(x, bits=spec.bits)
        if name not in self.acts:
            raise KeyError(f"site {name!r} is quantized by config {self.config.name!r} but has "
                           "no step (was it calibrated?)")
        p = self.acts[name]
        return fake_quant(x, p.scale, p.zero_point, spec.fmt,
                          per_step_elements=features_per_example(x, p.scale))

    @contextlib.contextmanager
    def intercept(self):
        """Fake-quantizes every configured activation site of models applied inside."""
        with sites.intercept(self.handler):
            yield

    def scales(self):
        """The trainable leaves: {"acts": {site: scale}, "weights": {site: scale}}."""
        return {"acts": {n: p.scale for n, p in self.acts.items()},
                "weights": {n: p.scale for n, p in self.weights.items()}}

    def with_scales(self, scales):
        """This state with the steps of `scales` (the tree `scales()` returns)."""
        swap = lambda d, s: {n: p.replace(scale=s[n]) for n, p in d.items()}
        return self.replace(acts=swap(self.acts, scales["acts"]),
                            weights=swap(self.weights, scales["weights"]))


# The lowest a learned step may go, as a fraction of its calibrated value (`keep_positive`).
MIN_STEP_FRACTION = 1e-3


def keep_positive(scales, calibrated):
    """`scales` (the tree `LSQState.scales()` returns) with every step raised to at least
    MIN_STEP_FRACTION x its calibrated value in `calibrated` (a tree of the same form)."""
    return jax.tree.map(lambda s, c: jnp.maximum(s, MIN_STEP_FRACTION * c), scales, calibrated)


def from_qstate(qstate: state_lib.QState) -> LSQState:
    """The PTQ calibration's scales and zero points as LSQ's initial steps. A compensated
    QState (QwT) is refused: its compensation was solved for the calibrated towers."""
    if qstate.compensation:
        raise ValueError("LSQ starts from a plain PTQ calibration; this QState carries a QwT "
                         f"compensation of {len(qstate.compensation)} blocks")
    f32 = lambda d: {n: state_lib.QParams(jnp.asarray(p.scale, jnp.float32),
                                          jnp.asarray(p.zero_point, jnp.float32))
                     for n, p in d.items()}
    return LSQState(config=qstate.config, acts=f32(qstate.acts), weights=f32(qstate.weights))


def to_qstate(lsq: LSQState, params) -> state_lib.QState:
    """A calibrated-style QState of the learned steps and the kernels they quantize, for
    evaluation on the integer paths and `quant.export` (the codes of those kernels). Every
    step must be positive (a non-positive one has no integer grid): ValueError naming it."""
    for kind, table in (("activation", lsq.acts), ("weight", lsq.weights)):
        for name, p in table.items():
            if not bool(jnp.all(p.scale > 0)):
                raise ValueError(f"the learned {kind} step of {name!r} is not positive (min "
                                 f"{float(jnp.min(p.scale))}); lower qat.scale_lr")
    kernels = sites.kernels(params)
    return state_lib.QState(
        config=lsq.config, acts=dict(lsq.acts), weights=dict(lsq.weights),
        kernels={name: lsq.kernel(name, kernels[name]) for name in lsq.weights})
