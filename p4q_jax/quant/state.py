"""The calibrated quantization state: scales/zero points and the once-quantized weights."""

import contextlib

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from p4q_jax.clip import model as model_lib
from p4q_jax.quant import matmul
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
      codes: the matmuls that fit (`quant.matmul`) run on integer codes, the arithmetic of
        the int8 path (inference: the same features bit for bit). False in a train step,
        which multiplies the dequantized values instead: the same straight-through
        gradients, without deriving the frozen kernels' codes every step.
      compensation: transformer block path -> {"kernel" [W, W], "bias" [W]}, float32: a
        linear map of the block's input added to its output (QwT, `quant.compensation`);
        empty without one.
    """

    config: qconfig_lib.QConfig = flax.struct.field(pytree_node=False)
    acts: dict
    weights: dict
    kernels: dict
    codes: bool = flax.struct.field(pytree_node=False, default=True)
    compensation: dict = flax.struct.field(default_factory=dict)

    def quantized_params(self, params):
        """`params` with every quantized kernel swapped for its fake-quantized copy."""
        return sites.replace_kernels(params, self.kernels)

    def text_only(self, params):
        """(params with the text tower's quantized kernels swapped in, this state without the
        image tower's sites and with no kernels of its own): what a text-only consumer
        holds, each kernel once."""
        text = lambda d: {n: v for n, v in d.items() if not n.startswith("visual/")}
        params = sites.replace_kernels(params, text(self.kernels))
        return params, self.replace(acts=text(self.acts), weights=text(self.weights), kernels={},
                                    compensation=text(self.compensation))

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

    def code_domain(self, module):
        """Whether a Dense / Conv module's matmul runs on codes (`quant.matmul.fits`)."""
        name = sites.site_name(module)
        if name not in self.weights or not matmul.fits(self.config, self.acts, name):
            return False
        return isinstance(module, nn.Dense) or (isinstance(module, nn.Conv)
                                                 and matmul.patchify(module))

    def _code_matmul(self, module, x):
        name = sites.site_name(module)
        kernel = module.get_variable("params", "kernel")
        if isinstance(module, nn.Conv):
            x = matmul.patches(x, module.kernel_size)
        y = matmul.matmul(x, self.acts[name], self.config.spec("input", name).fmt, kernel,
                          self.weights[name], self.config.spec("weight", name).fmt)
        if module.use_bias:
            y = y + module.get_variable("params", "bias")
        return y.astype(module.dtype or x.dtype)

    def _compensate(self, block, next_fun, args, kwargs):
        """A block's output plus the compensation of its input (in prefix mode, of both the
        prefix and the continuation: `clip.model.ResidualAttentionBlock`)."""
        c = self.compensation[block]

        def add(y, x):
            return y + (x.astype(jnp.float32) @ c["kernel"] + c["bias"]).astype(y.dtype)

        out = next_fun(*args, **kwargs)
        if kwargs.get("prefix") is None:
            return add(out, args[0])
        prefix_out, x_out = out
        return add(prefix_out, kwargs["prefix"]), add(x_out, args[0])

    @contextlib.contextmanager
    def intercept(self):
        """Fake-quantizes every configured activation site of models applied inside; with
        `codes`, the layers and attention products that fit compute on the integer codes
        (`quant.matmul`); every compensated block gets its compensation added."""

        def compensator(next_fun, args, kwargs, context):
            if (context.method_name == "__call__"
                    and isinstance(context.module, model_lib.ResidualAttentionBlock)
                    and (block := sites.site_name(context.module)) in self.compensation):
                return self._compensate(block, next_fun, args, kwargs)
            return next_fun(*args, **kwargs)

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__":
                if isinstance(module, (nn.Dense, nn.Conv)) and self.code_domain(module):
                    return self._code_matmul(module, args[0])
                if (isinstance(module, model_lib.Product)
                        and all(x.dtype == jnp.float32 for x in args[:2])  # exact codes
                        and (names := matmul.product_sites(self.config, self.acts, module))):
                    a, b = args[:2]
                    y = matmul.product(module.equation, a, self.acts[names[0]], b,
                                       self.acts[names[1]])
                    return y.astype(a.dtype)
            return next_fun(*args, **kwargs)

        # Outer interceptors run first: code-domain layers bypass their input's site.
        with (nn.intercept_methods(compensator) if self.compensation
              else contextlib.nullcontext(),
              nn.intercept_methods(interceptor) if self.codes else contextlib.nullcontext(),
              sites.intercept(self.handler)):
            yield
