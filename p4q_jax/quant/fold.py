"""Folding inference BatchNorm into the preceding convolution, as a deployed integer model does.

A ResNet conv followed by `FrozenBatchNorm` computes conv(x, K) * s + t per output channel
(s = scale / sqrt(var + eps), t = bias - mean * s). Folding rewrites the kernel to K * s and
leaves the BatchNorm as a bias add of t (scale 1, mean 0, var 1 - eps), so the float model is
unchanged (up to rounding) and weight quantization then sees the kernel the integer conv
really multiplies by. With per-output-channel kernel scales (every preset) the folded kernel
gets the same codes up to sign; per-tensor kernel scales are where folding changes them.
"""

import numpy as np
from flax import traverse_util

from p4q_jax.clip import model as model_lib

_BN_LEAVES = ("scale", "bias", "mean", "var")


def _conv_of(bn_path):
    """`.../bn2` -> `.../conv2`; `.../downsample_1` -> `.../downsample_0`."""
    parent, _, name = bn_path.rpartition("/")
    if name.startswith("bn"):
        conv = "conv" + name[2:]
    elif name == "downsample_1":
        conv = "downsample_0"
    else:
        raise ValueError(f"{bn_path}: a BatchNorm with no known preceding convolution")
    return f"{parent}/{conv}" if parent else conv


def batch_norm_paths(params):
    """Paths of every FrozenBatchNorm in a params tree (empty for a ViT)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return sorted({k.rpartition("/")[0] for k in flat if k.endswith("/var")
                   and all(f"{k.rpartition('/')[0]}/{leaf}" in flat for leaf in _BN_LEAVES)})


def fold_batchnorm(params):
    """`params` with every BatchNorm folded into its conv kernel (see the module docstring);
    raises ValueError when there is none to fold (a ViT has no BatchNorm)."""
    paths = batch_norm_paths(params)
    if not paths:
        raise ValueError("quant.fold_batchnorm: the model has no BatchNorm to fold (only "
                         "CLIP's ResNet image towers have)")
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    eps = model_lib.BATCH_NORM_EPS
    for bn in paths:
        scale, bias, mean, var = (np.asarray(flat[f"{bn}/{leaf}"], np.float64)
                                  for leaf in _BN_LEAVES)
        s = scale / np.sqrt(var + eps)
        kernel = f"{_conv_of(bn)}/kernel"
        dtype = np.asarray(flat[kernel]).dtype
        flat[kernel] = (np.asarray(flat[kernel], np.float64) * s).astype(dtype)
        flat[f"{bn}/scale"] = np.ones_like(scale, dtype)
        flat[f"{bn}/bias"] = (bias - mean * s).astype(dtype)
        flat[f"{bn}/mean"] = np.zeros_like(mean, dtype)
        flat[f"{bn}/var"] = np.full_like(var, 1.0 - eps, dtype)
    return traverse_util.unflatten_dict(flat, sep="/")
