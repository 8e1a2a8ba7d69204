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


# OpenAI's models use quick_gelu; open_clip's and Hugging Face's non-OpenAI ones exact gelu.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


def _activation(name):
    return ACTIVATIONS[name]


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (OpenAI's `in_proj`).

    With `prefix` ([1, P, W], the normalized input of a sequence start shared by every row
    of `x`), `x` [N, S, W] is that start's continuation: the prefix attends causally to
    itself once, and each row of `x` attends to the prefix's keys/values and causally to
    its own (prefix mode is always causal; `mask` is not used). Returns (prefix output,
    x output): the same values as running the N full sequences, with the prefix computed
    once (through the same quantization sites, whose scales are fixed after calibration).
    """

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, prefix=None):
        width = x.shape[-1]
        head_dim = width // self.heads
        std = width**-0.5
        in_proj = nn.Dense(3 * width, dtype=self.dtype, name="in_proj",
                           kernel_init=nn.initializers.normal(std))
        out_proj = nn.Dense(width, dtype=self.dtype, name="out_proj",
                            kernel_init=nn.initializers.normal(std))
        q_site, k_site, v_site = Site(name="q"), Site(name="k"), Site(name="v")
        logits_site, probs_site = Site(name="logits"), Site(name="probs")

        def project(h):
            qkv = in_proj(h).reshape(*h.shape[:2], 3, self.heads, head_dim)
            return q_site(qkv[:, :, 0]), k_site(qkv[:, :, 1]), v_site(qkv[:, :, 2])

        def scores(q, k):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
            return logits.astype(jnp.float32)

        def attend(logits, mask):
            logits = logits_site(logits)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
            return probs_site(jax.nn.softmax(logits, axis=-1))

        def output(out):
            return out_proj(out.reshape(*out.shape[:2], width))

        q, k, v = project(x)
        if prefix is None:
            probs = attend(scores(q, k), mask)
            return output(jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v))
        qp, kp, vp = project(prefix)
        causal_p = nn.make_causal_mask(jnp.ones(prefix.shape[:2], bool))
        probs_p = attend(scores(qp, kp), causal_p)
        out_p = jnp.einsum("bhqk,bkhd->bqhd", probs_p.astype(self.dtype), vp)
        length_p, length = prefix.shape[1], x.shape[1]
        to_prefix = jnp.einsum("bqhd,khd->bhqk", q, kp[0]) * head_dim**-0.5
        logits = jnp.concatenate([to_prefix.astype(jnp.float32), scores(q, k)], axis=-1)
        mask = jnp.concatenate(
            [jnp.ones((length, length_p), bool), jnp.tril(jnp.ones((length, length), bool))],
            axis=-1)
        probs = attend(logits, mask).astype(self.dtype)
        out = (jnp.einsum("bhqk,khd->bqhd", probs[..., :length_p], vp[0])
               + jnp.einsum("bhqk,bkhd->bqhd", probs[..., length_p:], v))
        return output(out_p), output(out)


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
    def __call__(self, x, mask=None, prefix=None):
        """x -> x; with a shared `prefix` (see `Attention`), (prefix, x) -> (prefix, x)."""
        ln_1 = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="ln_1")
        ln_2 = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="ln_2")
        attn = Attention(self.heads, dtype=self.dtype, name="attn")
        mlp = MLP(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")
        if prefix is None:
            x = x + attn(ln_1(x), mask)
            return x + mlp(ln_2(x))
        attn_p, attn_x = attn(ln_1(x), prefix=ln_1(prefix))
        prefix, x = prefix + attn_p, x + attn_x
        return prefix + mlp(ln_2(prefix)), x + mlp(ln_2(x))


class Transformer(nn.Module):
    layers: int
    heads: int
    mlp_dim: int
    activation: str
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, prefix=None):
        """x -> x; with a shared causal `prefix` [1, P, W], (prefix, x) -> x."""
        for i in range(self.layers):
            block = ResidualAttentionBlock(
                self.heads, self.mlp_dim, self.activation, self.eps, dtype=self.dtype,
                name=f"resblocks_{i}")
            if prefix is None:
                x = block(x, mask)
            else:
                prefix, x = block(x, prefix=prefix)
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

    def _check_length(self, length):
        if length > self.config.context_length:
            raise ValueError(
                f"text length {length} exceeds the context length {self.config.context_length}"
            )

    def _features(self, x, eot_index):
        x = jnp.take_along_axis(x, eot_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.text_projection(self.ln_final(x))

    def encode_embeddings(self, x, eot_index):
        """Token embeddings [N, L, width] and EOT positions [N] -> features [N, embed_dim]."""
        length = x.shape[1]
        self._check_length(length)
        x = (x + self.positional_embedding[:length]).astype(self.dtype)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], dtype=bool))
        return self._features(self.transformer(x, mask), eot_index)

    def encode_prefixed(self, prefix, x, eot_index):
        """Like `encode_embeddings` on N sequences that all start with the same `prefix`.

        prefix [P, width] is encoded once; x [N, S, width] holds each sequence's remaining
        tokens and eot_index [N] their EOT positions counted from the start of x. Under the
        causal mask this is the same math as `encode_embeddings` on the N concatenations.
        """
        length_p, length = prefix.shape[0], x.shape[1]
        self._check_length(length_p + length)
        prefix = (prefix + self.positional_embedding[:length_p]).astype(self.dtype)[None]
        x = (x + self.positional_embedding[length_p:length_p + length]).astype(self.dtype)
        return self._features(self.transformer(x, prefix=prefix), eot_index)

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

    def encode_text_prefixed(self, prefix, x, eot_index):
        return self.text.encode_prefixed(prefix, x, eot_index)

    def __call__(self, images, tokens):
        """Both towers and the temperature (used to create parameters)."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale
