"""Jitted feature extraction: the `clip.encode_image` / `clip.encode_text` entry points.

The model (a hashable Flax module built from frozen config data) is a static argument,
so each architecture and input shape compiles once and is reused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax.clip import model as model_lib


def crop_to_eot(tokens):
    """Drops the columns after the last EOT of the batch: a causal tower cannot see them."""
    tokens = np.asarray(tokens)
    return tokens[:, : int(np.asarray(model_lib.eot_index(tokens)).max()) + 1]


def apply(model, params, x, *, method, qstate=None):
    """`model.apply` of one method, quantized when a `quant.QState` is given.

    The QState supplies the once-quantized kernels and intercepts the activation sites;
    this layer only relies on its two methods, so `clip` does not import `quant`.
    """
    if qstate is None:
        return model.apply({"params": params}, x, method=method)
    with qstate.intercept():
        return model.apply({"params": qstate.quantized_params(params)}, x, method=method)


@functools.partial(jax.jit, static_argnames="model")
def _encode_image(model, params, images, qstate):
    return apply(model, params, images, method=model.encode_image, qstate=qstate)


@functools.partial(jax.jit, static_argnames="model")
def _encode_text(model, params, tokens, qstate):
    return apply(model, params, tokens, method=model.encode_text, qstate=qstate)


@jax.jit
def _token_range(tokens):
    return jnp.min(tokens), jnp.max(tokens)


def _check_token_ids(tokens, vocab_size):
    """Refuses ids outside [0, vocab_size): the embedding lookup would give NaN or another row.

    Checked where the ids are concrete: on the host for numpy input, by one small jitted min/max
    (two scalars back, not the array; it waits for the ids to be ready) for a jax Array; skipped
    for tracers (inside a jit).
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    if isinstance(tokens, jax.Array):
        low, high = (int(v) for v in jax.device_get(_token_range(tokens)))
    else:
        low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = np.asarray(tokens)
        bad = np.unique(bad[(bad < 0) | (bad >= vocab_size)])
        raise ValueError(f"tokens: ids must be in [0, {vocab_size}) (the vocabulary size), got "
                         f"{bad[:10].tolist()}{' ...' if len(bad) > 10 else ''}")


def encode_image(model, params, images, *, qstate=None):
    """Images float32 [B, H, W, 3], CLIP-normalized -> unnormalized features [B, embed_dim].

    With `qstate` (from `quant.calibrate`) the quantized model runs instead.
    """
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    size = model.config.vision.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images: expected shape [B, {size}, {size}, 3], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images: expected CLIP-normalized float32 pixels, got {images.dtype}; "
                         "convert raw pixels with clip.preprocess")
    return _encode_image(model, params, jnp.asarray(images), qstate)


def encode_text(model, params, tokens, *, qstate=None):
    """Token ids int32 [N, L] (L <= context length) -> unnormalized features [N, embed_dim].

    With `qstate` (from `quant.calibrate`) the quantized model runs instead.
    """
    tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected int [N, L], got {tokens.dtype} {tokens.shape}")
    _check_token_ids(tokens, model.config.text.vocab_size)
    return _encode_text(model, params, jnp.asarray(tokens), qstate)
