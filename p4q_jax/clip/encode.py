"""Jitted feature extraction: the `clip.encode_image` / `clip.encode_text` entry points.

The model (a hashable Flax module built from frozen config data) is a static argument,
so each architecture and input shape compiles once and is reused.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames="model")
def _encode_image(model, params, images):
    return model.apply({"params": params}, images, method=model.encode_image)


@functools.partial(jax.jit, static_argnames="model")
def _encode_text(model, params, tokens):
    return model.apply({"params": params}, tokens, method=model.encode_text)


def encode_image(model, params, images):
    """Images float32 [B, H, W, 3], CLIP-normalized -> unnormalized features [B, embed_dim]."""
    images = jnp.asarray(images)
    size = model.config.vision.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images: expected shape [B, {size}, {size}, 3], got {images.shape}")
    return _encode_image(model, params, images)


def encode_text(model, params, tokens):
    """Token ids int32 [N, L] (L <= context length) -> unnormalized features [N, embed_dim]."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected int [N, L], got {tokens.dtype} {tokens.shape}")
    return _encode_text(model, params, tokens)
