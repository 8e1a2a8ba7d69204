"""OpenAI's CLIP architecture (ViT and ModifiedResNet image towers) as Flax linen modules,
applied as pure functions.

Parameters live under `visual/...` and `text/...` with OpenAI's module names, so a path
reads like the PyTorch state-dict key it came from (`text/transformer/resblocks_3/attn/
in_proj/kernel` is `transformer.resblocks.3.attn.in_proj_weight`).

Quantization sites (docs/design.md, "Quantization sites"): every `nn.Dense` / `nn.Conv` is a
weight site (its kernel) and an input site (its first argument); the attention tensors pass
through identity `Site` modules (`q`, `k`, `v`, `logits`, `probs`), in a ResNet's attention
pool too. BatchNorm stays float (`FrozenBatchNorm`, no site); `quant.fold_batchnorm` folds
it into the conv kernels before weight quantization. A quantizer attaches to these by module
path with `flax.linen.intercept_methods`, so one model definition serves FP, calibration and
quantized use.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from p4q_jax.clip import architectures


class Site(nn.Module):
    """An identity marking a named activation that a quantizer may intercept."""

    @nn.compact
    def __call__(self, x):
        return x


class Product(nn.Module):
    """A parameter-free einsum of two named activations (`operands`: the sibling `Site`s
    that produce them), a module only so that an integer path can intercept it."""

    equation: str
    operands: tuple[str, str]

    @nn.compact
    def __call__(self, a, b):
        return jnp.einsum(self.equation, a, b)


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
        qk = Product("bqhd,bkhd->bhqk", ("q", "k"), name="qk")
        pv = Product("bhqk,bkhd->bqhd", ("probs", "v"), name="pv")

        def project(h):
            qkv = in_proj(h).reshape(*h.shape[:2], 3, self.heads, head_dim)
            return q_site(qkv[:, :, 0]), k_site(qkv[:, :, 1]), v_site(qkv[:, :, 2])

        def scores(q, k):
            return (qk(q, k) * head_dim**-0.5).astype(jnp.float32)

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
            return output(pv(probs.astype(self.dtype), v))
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


# What a rematerialised block keeps for the backward pass (`Transformer.remat`): nothing
# (every block recomputed), or its matmul outputs (the element-wise work recomputed).
REMAT_POLICIES = {
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """Residual attention blocks. `remat` ("off" or a `REMAT_POLICIES` key) recomputes each
    block's activations in the backward pass instead of saving them: less memory for the
    same values and gradients (what prompt training over many classes needs)."""

    layers: int
    heads: int
    mlp_dim: int
    activation: str
    eps: float
    dtype: jnp.dtype = jnp.float32
    remat: str = "off"

    @nn.compact
    def __call__(self, x, mask=None, prefix=None):
        """x -> x; with a shared causal `prefix` [1, P, W], (prefix, x) -> x."""
        block_cls = ResidualAttentionBlock
        if self.remat != "off":
            block_cls = nn.remat(ResidualAttentionBlock, policy=REMAT_POLICIES[self.remat])
        for i in range(self.layers):
            block = block_cls(
                self.heads, self.mlp_dim, self.activation, self.eps, dtype=self.dtype,
                name=f"resblocks_{i}")
            if prefix is None:
                x = block(x, mask)
            else:
                prefix, x = block(x, prefix=prefix)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT: bias-free patch conv, class token, ln_pre, blocks, ln_post, projection."""

    config: architectures.VisionConfig
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


# torch.nn.BatchNorm2d's default epsilon, which OpenAI's and open_clip's ResNets keep.
BATCH_NORM_EPS = 1e-5


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode: y = (x - mean) / sqrt(var + eps) * scale + bias, with the
    checkpoint's running statistics held in `params` beside the affine (CLIP's towers are
    frozen, so no `batch_stats` collection is needed)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        inv = scale * jax.lax.rsqrt(var + BATCH_NORM_EPS)
        return (x * inv.astype(self.dtype) + (bias - mean * inv).astype(self.dtype))


def _avg_pool(x, stride):
    """torch.nn.AvgPool2d(stride) on NHWC (kernel = stride, no padding)."""
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


def _conv(features, size, name, dtype, stride=1):
    """A bias-free 'same' convolution as in CLIP's ResNets (padding size // 2)."""
    pad = size // 2
    return nn.Conv(features, (size, size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name)


class Bottleneck(nn.Module):
    """CLIP's ResNet block: 1x1, 3x3, (anti-aliasing average pool when strided), 1x1 (x4
    channels), each conv followed by BatchNorm; ReLU after the first two and after the sum.
    The shortcut is an average pool, a 1x1 conv and BatchNorm where the shape changes."""

    planes: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        bn = lambda name: FrozenBatchNorm(dtype=self.dtype, name=name)  # noqa: E731
        out = nn.relu(bn("bn1")(_conv(self.planes, 1, "conv1", self.dtype)(x)))
        out = nn.relu(bn("bn2")(_conv(self.planes, 3, "conv2", self.dtype)(out)))
        out = _avg_pool(out, self.stride)
        out = bn("bn3")(_conv(4 * self.planes, 1, "conv3", self.dtype)(out))
        identity = x
        if self.stride > 1 or x.shape[-1] != 4 * self.planes:
            identity = _conv(4 * self.planes, 1, "downsample_0", self.dtype)(
                _avg_pool(x, self.stride))
            identity = bn("downsample_1")(identity)
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's ResNet head: multi-head attention over the flattened feature map plus its mean
    (positional embeddings added to all), with the mean token as the only query; separate
    q/k/v projections and `c_proj` as the output projection. Same `Site`s as `Attention`."""

    heads: int
    output_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        head_dim = c // self.heads
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(c**-0.5),
                         (h * w + 1, c))
        x = x + pos.astype(x.dtype)

        def project(name, tokens):
            dense = nn.Dense(c, dtype=self.dtype, name=f"{name}_proj",
                             kernel_init=nn.initializers.normal(c**-0.5))
            return Site(name=name)(dense(tokens).reshape(b, -1, self.heads, head_dim))

        q, k, v = project("q", x[:, :1]), project("k", x), project("v", x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        logits = Site(name="logits")(logits.astype(jnp.float32))
        probs = Site(name="probs")(jax.nn.softmax(logits, axis=-1))
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(b, c)
        return nn.Dense(self.output_dim, dtype=self.dtype, name="c_proj",
                        kernel_init=nn.initializers.normal(c**-0.5))(out)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower (OpenAI's `ModifiedResNet`): a 3-conv stem (stride 2, then
    two stride-1 convs, each with BatchNorm and ReLU) and a 2x2 average pool, four stages of
    `Bottleneck`s (64, 128, 256, 512 x width/64 planes; stages 2-4 start with stride 2) and
    the `AttentionPool2d` head. Inputs NHWC."""

    config: architectures.VisionConfig
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = images.astype(self.dtype)
        stem = ((cfg.width // 2, 2), (cfg.width // 2, 1), (cfg.width, 1))
        for i, (features, stride) in enumerate(stem, 1):
            x = _conv(features, 3, f"conv{i}", self.dtype, stride=stride)(x)
            x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name=f"bn{i}")(x))
        x = _avg_pool(x, 2)
        for stage, depth in enumerate(cfg.layers, 1):
            planes = cfg.width * 2 ** (stage - 1)
            for j in range(depth):
                stride = 2 if stage > 1 and j == 0 else 1
                x = Bottleneck(planes, stride, dtype=self.dtype, name=f"layer{stage}_{j}")(x)
        return AttentionPool2d(cfg.heads, self.embed_dim, dtype=self.dtype, name="attnpool")(x)


class TextTransformer(nn.Module):
    """CLIP's causal text tower, with an entry point that takes token embeddings.

    `encode_embeddings` is what prompt learning calls: learned context vectors replace
    token embeddings before the tower. The sequence may be shorter than the context
    length (positions after the last EOT cannot change a causal model's EOT feature).
    """

    config: architectures.TextConfig
    embed_dim: int
    activation: str
    eps: float
    dtype: jnp.dtype = jnp.float32
    remat: str = "off"  # see `Transformer`

    def setup(self):
        cfg = self.config
        self.token_embedding = nn.Embed(cfg.vocab_size, cfg.width,
                                        embedding_init=nn.initializers.normal(0.02))
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.01),
            (cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.layers, cfg.heads, cfg.mlp_dim, self.activation,
                                       self.eps, dtype=self.dtype, remat=self.remat)
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


DTYPES = ("float32", "bfloat16", "float16")  # computation dtypes (parameters stay float32)


def eot_index(tokens):
    """Position of the end-of-text token: it has the largest id in CLIP's vocabulary."""
    return jnp.argmax(tokens, axis=-1)


class CLIP(nn.Module):
    """The two towers plus the learned temperature `logit_scale` (log of 1/T). `text_remat`:
    the text tower's `Transformer.remat` (prompt training: `model.clone(text_remat=...)`)."""

    config: architectures.CLIPConfig
    dtype: jnp.dtype = jnp.float32
    text_remat: str = "off"

    def setup(self):
        cfg = self.config
        if cfg.vision.is_resnet:
            self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim, dtype=self.dtype)
        else:
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.activation,
                                            cfg.layer_norm_eps, dtype=self.dtype)
        self.text = TextTransformer(cfg.text, cfg.embed_dim, cfg.activation,
                                    cfg.layer_norm_eps, dtype=self.dtype, remat=self.text_remat)
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
