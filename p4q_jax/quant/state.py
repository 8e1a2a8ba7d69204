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

    def text_only(self, params):
        """(params with the text tower's quantized kernels swapped in, this state without the
        image tower's sites and with no kernels of its own): what a text-only consumer
        holds, each kernel once."""
        text = lambda d: {n: v for n, v in d.items() if not n.startswith("visual/")}
        params = sites.replace_kernels(params, text(self.kernels))
        return params, self.replace(acts=text(self.acts), weights=text(self.weights), kernels={})

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
