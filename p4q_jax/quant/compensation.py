"""QwT (Quantization without Tears, arXiv 2411.13918): a closed-form linear compensation
per transformer block of a post-training-quantized CLIP.

After calibration every residual attention block of both ViT towers gets a map
`c(x) = x W + b` of its input `x`, added to its output (`QState.compensation`, applied by
`QState.intercept`, so fake-quant, the int8 path and exports all carry it). `W, b` are the
ridge-regression solution of `Y_fp - Y_q ~ X_q W + b` on the calibration data, where
`Y_fp` is the FP model's block output, `X_q` the block's input in the quantized model and
`Y_q` its quantized output. Blocks are solved in order, each on the inputs of the quantized
network already compensated up to it, so a block corrects the error it inherits as well
as its own.

Choices (the paper leaves them open or to its code, which is not read here):
* Blocks: the residual attention blocks of the ViT image tower and of the text tower. A
  ResNet image tower gets none: its stages change resolution and width, so a per-stage
  map would be a learned 1x1 conv with a strided shortcut, which is not the paper's
  block-output compensation; its text tower is compensated.
* Rows: every token of every calibration image; for the text tower only the positions up
  to each prompt's end-of-text token (a causal tower's later positions never reach the
  EOT feature, and after cropping they are padding).
* Ridge: `ridge` times the mean of diag(X^T X) is added to the diagonal for `W` (a
  scale-free damping; the bias is not penalized), which keeps the solve well posed when
  the calibration set has fewer rows than the width.
* Precision: the normal equations X^T X and X^T R are accumulated batch by batch on the
  host in float64 and solved there: forming X^T X squares the condition number, which
  float32 sums over 10^4-10^5 rows would not hold, and a (W+1)^2 solve per block is
  milliseconds.
* Storage: `W` [W, W] and `b` [W] stay float32 (not quantized); an export stores them
  beside the integer kernels and counts their bytes.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax import clip
from p4q_jax.clip import model as model_lib
from p4q_jax.quant import sites

METHODS = ("none", "qwt")
RIDGE = 1e-3  # relative to the mean diagonal of X^T X, see the module doc


def ridge_solve(xtx, xtr, ridge=RIDGE):
    """Normal equations of the rows [X, 1] -> (W [D, K], b [K]) minimizing
    |R - X W - b|^2 + lam |W|^2, lam = `ridge` * mean(diag(X^T X)).

    `xtx` [D+1, D+1] and `xtr` [D+1, K] are float64 sums over rows of the augmented X
    (a last column of ones) times itself and times the residual R."""
    d = xtx.shape[0] - 1
    lam = ridge * np.trace(xtx[:d, :d]) / d
    a = xtx + np.diag(np.r_[np.full(d, lam), 0.0])
    theta = np.linalg.solve(a, xtr)
    return theta[:d].astype(np.float32), theta[d].astype(np.float32)


def block_names(model, tower):
    """Paths of the compensated blocks of `tower` ("visual" or "text"), in forward order."""
    cfg = model.config.vision if tower == "visual" else model.config.text
    if tower == "visual" and cfg.is_resnet:
        return []
    return [f"{tower}/transformer/resblocks_{i}" for i in range(cfg.layers)]


def _capture(block, store):
    """An interceptor that records `block`'s input and output (its continuation, with a
    prefix) into `store`."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (context.method_name == "__call__"
                and isinstance(context.module, model_lib.ResidualAttentionBlock)
                and sites.site_name(context.module) == block):
            store["x"], store["y"] = args[0], out
        return out

    return interceptor


@functools.partial(jax.jit, static_argnames=("model", "method", "block"))
def block_activations(model, params, qstate, x, *, method, block):
    """(X_q, Y_q, Y_fp) of `block` on one batch: its input and uncompensated output in the
    quantized model (`qstate`, with its compensation of the blocks before) and its output
    in the FP model, each [B, T, W] float32."""
    fp, q = {}, {}
    with nn.intercept_methods(_capture(block, fp)):
        model.apply({"params": params}, x, method=method)
    uncompensated = qstate.replace(
        compensation={k: v for k, v in qstate.compensation.items() if k != block})
    # Inside the QState's interceptors: the block's output before any compensation of its own.
    with uncompensated.intercept(), nn.intercept_methods(_capture(block, q)):
        model.apply({"params": qstate.quantized_params(params)}, x, method=method)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return f32(q["x"]), f32(q["y"]), f32(fp["y"])


def _tower_batches(model, tower, images, texts, text_batch_size):
    """[(method, batch, valid [B, T] bool or None)] of a tower's calibration data."""
    if tower == "visual":
        return [(model.encode_image, jnp.asarray(b), None) for b in images]
    tokens = clip.crop_to_eot(clip.tokenize(list(texts)))
    lengths = np.asarray(model_lib.eot_index(tokens)) + 1
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return [(model.encode_text, tokens[i:i + text_batch_size], valid[i:i + text_batch_size])
            for i in range(0, len(tokens), text_batch_size)]


def _rows(a, valid):
    a = np.asarray(a, np.float64)
    return a.reshape(-1, a.shape[-1]) if valid is None else a[valid]


def compensate(model, params, qstate, *, images=None, texts=None, text_batch_size=256,
               ridge=RIDGE):
    """QwT: `qstate` with a closed-form compensation of every ViT block (see module doc).

    Args:
      model, params: the `clip.CLIP` and its FP params that `qstate` was calibrated on.
      qstate: a calibrated `quant.QState` (without compensation).
      images: the image tower's calibration batches, float32 [B, H, W, 3] (a sequence: each
        block reads them again); its blocks are compensated when given.
      texts: prompt strings; the text tower's blocks are compensated when given.
      text_batch_size: prompts per pass.
      ridge: the relative ridge term (`ridge_solve`).
    """
    if qstate.compensation:
        raise ValueError("qstate: already compensated (compensate the calibrated QState once)")
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts: expected a list of prompt strings, got one string")
    if images is not None and hasattr(images, "ndim"):
        images = [images]
    towers = [t for t, data in (("visual", images), ("text", texts)) if data]
    if not towers:
        raise ValueError("compensate: give calibration images, texts or both")
    compensation = {}
    for tower in towers:
        batches = _tower_batches(model, tower, images, texts, text_batch_size)
        for block in block_names(model, tower):
            state = qstate.replace(compensation=dict(compensation))
            xtx = xtr = None
            for method, x, valid in batches:
                xq, yq, yfp = block_activations(model, params, state, x, method=method,
                                                block=block)
                xq, r = _rows(xq, valid), _rows(yfp, valid) - _rows(yq, valid)
                xa = np.concatenate([xq, np.ones((len(xq), 1))], axis=1)
                xtx = (0 if xtx is None else xtx) + xa.T @ xa
                xtr = (0 if xtr is None else xtr) + xa.T @ r
            kernel, bias = ridge_solve(xtx, xtr, ridge)
            compensation[block] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    return qstate.replace(compensation=compensation)
