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


@functools.partial(jax.jit, static_argnames="eot")
def _token_summary(tokens, eot):
    return jnp.min(tokens), jnp.max(tokens), jnp.all(jnp.any(tokens == eot, axis=1))


def _some(values):
    values = np.asarray(values)
    return f"{values[:10].tolist()}{' ...' if len(values) > 10 else ''}"


def _check_token_ids(tokens, vocab_size):
    """Refuses ids outside [0, vocab_size) (the embedding lookup would give NaN or another
    row) and rows without the end-of-text token, the vocabulary's last id (the features are
    read at a row's largest id: at another token, without it).

    Checked where the ids are concrete: on the host for numpy input, by one small jitted
    summary (three scalars back, not the array; it waits for the ids to be ready) for a jax
    Array; skipped for tracers (inside a jit).
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    eot = vocab_size - 1
    if isinstance(tokens, jax.Array):
        low, high, every_eot = jax.device_get(_token_summary(tokens, eot))
    else:
        low, high, every_eot = tokens.min(), tokens.max(), (tokens == eot).any(axis=1).all()
    if low < 0 or high >= vocab_size:
        bad = np.asarray(tokens)
        bad = np.unique(bad[(bad < 0) | (bad >= vocab_size)])
        raise ValueError(f"tokens: ids must be in [0, {vocab_size}) (the vocabulary size), got "
                         f"{_some(bad)}")
    if not every_eot:
        rows = np.flatnonzero(~(np.asarray(tokens) == eot).any(axis=1))
        raise ValueError(f"tokens: rows {_some(rows)} have no end-of-text token (id {eot}), "
                         "where the text features are read; tokenize texts with clip.tokenize")


@jax.jit
def _all_finite(images):
    return jnp.all(jnp.isfinite(images))


def _check_finite_pixels(images):
    """Refuses NaN or infinite pixels (they make every feature of their image NaN). On the
    host for numpy input, by one jitted reduction (a scalar back) for a jax Array; skipped
    for tracers (inside a jit)."""
    if isinstance(images, jax.core.Tracer):
        return
    finite = jax.device_get(_all_finite(images)) if isinstance(images, jax.Array) else \
        np.isfinite(images).all()
    if not finite:
        bad = ~np.isfinite(np.asarray(images))
        raise ValueError(f"images: {int(bad.sum())} pixel values are NaN or infinite (in images "
                         f"{_some(np.flatnonzero(bad.any(axis=(1, 2, 3))))})")


def encode_image(model, params, images, *, qstate=None):
    """Images float32 [B, H, W, 3], CLIP-normalized and finite -> unnormalized features
    [B, embed_dim].

    With `qstate` (from `quant.calibrate`) the quantized model runs instead.
    """
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    size = model.config.vision.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images: expected shape [B, {size}, {size}, 3], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images: expected CLIP-normalized float32 pixels, got {images.dtype}; "
                         "convert raw pixels with clip.preprocess")
    _check_finite_pixels(images)
    return _encode_image(model, params, jnp.asarray(images), qstate)


def encode_text(model, params, tokens, *, qstate=None):
    """Token ids int32 [N, L] (L <= context length; every row with its end-of-text token, as
    `clip.tokenize` writes them) -> unnormalized features [N, embed_dim].

    With `qstate` (from `quant.calibrate`) the quantized model runs instead.
    """
    tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected int [N, L], got {tokens.dtype} {tokens.shape}")
    _check_token_ids(tokens, model.config.text.vocab_size)
    return _encode_text(model, params, jnp.asarray(tokens), qstate)
