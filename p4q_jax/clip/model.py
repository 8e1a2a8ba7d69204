"""OpenAI's CLIP architecture as Flax linen modules, applied as pure functions.

Parameters live under `visual/...` and `text/...` with OpenAI's module names, so a path
reads like the PyTorch state-dict key it came from (`text/transformer/resblocks_3/attn/
in_proj/kernel` is `transformer.resblocks.3.attn.in_proj_weight`).

Quantization sites (see DESIGN.md): every `nn.Dense` / `nn.Conv` is a weight site (its
kernel) and an input site (its first argument); the attention tensors pass through
identity `Site` modules (`q`, `k`, `v`, `logits`, `probs`). A quantizer attaches to these
by module path with `flax.linen.intercept_methods`, so one model definition serves FP,
calibration and quantized use.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from p4q_jax.clip import configs


class Site(nn.Module):
    """An identity marking a named activation that a quantizer may intercept."""

    @nn.compact
    def __call__(self, x):
        return x


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name):
    return {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}[name]


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (OpenAI's `in_proj`)."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        batch, length, width = x.shape
        head_dim = width // self.heads
        std = width**-0.5
        qkv = nn.Dense(3 * width, dtype=self.dtype, name="in_proj",
                       kernel_init=nn.initializers.normal(std))(x)
        q, k, v = (t.reshape(batch, length, self.heads, head_dim)
                   for t in jnp.split(qkv, 3, axis=-1))
        q, k, v = Site(name="q")(q), Site(name="k")(k), Site(name="v")(v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        logits = Site(name="logits")(logits.astype(jnp.float32))
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = Site(name="probs")(jax.nn.softmax(logits, axis=-1))
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return nn.Dense(width, dtype=self.dtype, name="out_proj",
                        kernel_init=nn.initializers.normal(std))(out.reshape(batch, length, width))


class MLP(nn.Module):
    mlp_dim: int
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="c_fc",
                     kernel_init=nn.initializers.normal((2 * width) ** -0.5))(x)
        x = _activation(self.activation)(x)
        return nn.Dense(width, dtype=self.dtype, name="c_proj",
                        kernel_init=nn.initializers.normal(width**-0.5))(x)


class ResidualAttentionBlock(nn.Module):
    heads: int
    mlp_dim: int
    activation: str
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        ln = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)
        x = x + Attention(self.heads, dtype=self.dtype, name="attn")(ln("ln_1")(x), mask)
        return x + MLP(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(ln("ln_2")(x))


class Transformer(nn.Module):
    layers: int
    heads: int
    mlp_dim: int
    activation: str
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.layers):
            x = ResidualAttentionBlock(
                self.heads, self.mlp_dim, self.activation, self.eps, dtype=self.dtype,
                name=f"resblocks_{i}",
            )(x, mask)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT: bias-free patch conv, class token, ln_pre, blocks, ln_post, projection."""

    config: configs.VisionConfig
    embed_dim: int
    activation: str
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        scale = cfg.width**-0.5
        x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size),
                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                    use_bias=False, dtype=self.dtype, name="conv1")(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.width)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (cfg.width,))
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(scale),
                         (cfg.num_positions, cfg.width))
        x = x + pos.astype(x.dtype)
        x = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="ln_pre")(x)
        x = Transformer(cfg.layers, cfg.heads, cfg.mlp_dim, self.activation, self.eps,
                        dtype=self.dtype, name="transformer")(x)
        x = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="ln_post")(x[:, 0])
        return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name="proj",
                        kernel_init=nn.initializers.normal(scale))(x)


class TextTransformer(nn.Module):
    """CLIP's causal text tower, with an entry point that takes token embeddings.

    `encode_embeddings` is what prompt learning calls: learned context vectors replace
    token embeddings before the tower. The sequence may be shorter than the context
    length (positions after the last EOT cannot change a causal model's EOT feature).
    """

    config: configs.TextConfig
    embed_dim: int
    activation: str
    eps: float
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.token_embedding = nn.Embed(cfg.vocab_size, cfg.width,
                                        embedding_init=nn.initializers.normal(0.02))
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.01),
            (cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.layers, cfg.heads, cfg.mlp_dim, self.activation,
                                       self.eps, dtype=self.dtype)
        self.ln_final = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype)
        self.text_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                        kernel_init=nn.initializers.normal(cfg.width**-0.5))

    def embed(self, tokens):
        """Token ids [N, L] -> token embeddings [N, L, width] (no positions)."""
        return self.token_embedding(tokens)

    def encode_embeddings(self, x, eot_index):
        """Token embeddings [N, L, width] and EOT positions [N] -> features [N, embed_dim]."""
        length = x.shape[1]
        if length > self.config.context_length:
            raise ValueError(
                f"text length {length} exceeds the context length {self.config.context_length}"
            )
        x = (x + self.positional_embedding[:length]).astype(self.dtype)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], dtype=bool))
        x = self.transformer(x, mask)
        x = jnp.take_along_axis(x, eot_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.text_projection(self.ln_final(x))

    def __call__(self, tokens):
        return self.encode_embeddings(self.embed(tokens), eot_index(tokens))


def eot_index(tokens):
    """Position of the end-of-text token: it has the largest id in CLIP's vocabulary."""
    return jnp.argmax(tokens, axis=-1)


class CLIP(nn.Module):
    """The two towers plus the learned temperature `logit_scale` (log of 1/T)."""

    config: configs.CLIPConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        if not isinstance(cfg.vision.layers, int):
            raise NotImplementedError("ModifiedResNet image towers are not implemented yet")
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.activation,
                                        cfg.layer_norm_eps, dtype=self.dtype)
        self.text = TextTransformer(cfg.text, cfg.embed_dim, cfg.activation,
                                    cfg.layer_norm_eps, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())

    def encode_image(self, images):
        """Images float32 [B, H, W, 3] (CLIP-normalized) -> features [B, embed_dim]."""
        return self.visual(images)

    def encode_text(self, tokens):
        """Token ids int32 [N, L] -> features [N, embed_dim]."""
        return self.text(tokens)

    def embed_tokens(self, tokens):
        return self.text.embed(tokens)

    def encode_text_embeddings(self, x, eot_index):
        return self.text.encode_embeddings(x, eot_index)

    def __call__(self, images, tokens):
        """Both towers and the temperature (used to create parameters)."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale
