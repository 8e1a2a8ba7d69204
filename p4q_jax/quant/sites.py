"""Where quantizers attach to CLIP: named sites and a Flax method interceptor.

The model code (`clip/model.py`) knows nothing of quantization. Every `nn.Dense` /
`nn.Conv` input (kind `input`), every `Site` output (kind `attn`) and every
`nn.LayerNorm` input (kind `norm`, where FQ-ViT's PTF observer applies) passes through
`handler(kind, name, x)` while `intercept(handler)` is active; the name is the module
path (`text/transformer/resblocks_0/attn/in_proj`, `visual/transformer/resblocks_0/ln_1`). The same model then serves FP inference (no interceptor),
calibration (a handler that records statistics) and quantized inference (a handler
that fake-quantizes). Weight sites are the kernels, named by the same module paths.
"""

import contextlib

import flax.linen as nn
from flax import traverse_util

from p4q_jax.clip import model as model_lib

_KERNEL = "/kernel"


def site_name(module) -> str:
    return "/".join(module.path)


@contextlib.contextmanager
def intercept(handler):
    """Routes every activation site of the models applied inside through `handler`."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__":
            if isinstance(module, (nn.Dense, nn.Conv)):
                x = handler("input", site_name(module), args[0])
                return next_fun(x, *args[1:], **kwargs)
            if isinstance(module, nn.LayerNorm):
                x = handler("norm", site_name(module), args[0])
                return next_fun(x, *args[1:], **kwargs)
            if isinstance(module, model_lib.Site):
                return handler("attn", site_name(module), next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def kernels(params) -> dict:
    """{site name: kernel} for every Dense/Conv kernel in a params tree."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k[: -len(_KERNEL)]: v for k, v in flat.items() if k.endswith(_KERNEL)}


def replace_kernels(params, new_kernels) -> dict:
    """A params tree with the named kernels swapped in (no copies of the rest)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for name, kernel in new_kernels.items():
        key = name + _KERNEL
        if key not in flat:
            raise KeyError(f"no kernel named {key!r} in the params tree")
        flat[key] = kernel
    return traverse_util.unflatten_dict(flat, sep="/")
