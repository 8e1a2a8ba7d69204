"""The calibrated quantization state: scales/zero points and the once-quantized weights."""

import contextlib

import flax.struct
import jax

from p4q_jax.quant import primitives
from p4q_jax.quant import qconfig as qconfig_lib
from p4q_jax.quant import sites


@flax.struct.dataclass
class QParams:
    """Scale and zero point of one site, shaped to broadcast against its tensor."""

    scale: jax.Array
    zero_point: jax.Array


@flax.struct.dataclass
class QState:
    """Everything a quantized forward pass needs besides the FP params.

    Attributes:
      config: the QConfig (static).
      acts: activation site name -> QParams.
      weights: kernel site name -> QParams.
      kernels: kernel site name -> fake-quantized kernel, computed once at calibration
        (never re-quantized per step).
    """

    config: qconfig_lib.QConfig = flax.struct.field(pytree_node=False)
    acts: dict
    weights: dict
    kernels: dict

    def quantized_params(self, params):
        """`params` with every quantized kernel swapped for its fake-quantized copy."""
        return sites.replace_kernels(params, self.kernels)

    def handler(self, kind, name, x):
        spec = self.config.spec(kind, name)
        if spec is None:
            return x
        if spec.observer == "log2":
            return primitives.log2_quant(x, bits=spec.bits)
        if name not in self.acts:
            raise KeyError(f"site {name!r} is quantized by config {self.config.name!r} but was "
                           "not calibrated (was its tower given calibration data?)")
        p = self.acts[name]
        return primitives.fake_quant(x, p.scale, p.zero_point, spec.fmt)

    @contextlib.contextmanager
    def intercept(self):
        """Fake-quantizes every configured activation site of models applied inside."""
        with sites.intercept(self.handler):
            yield
