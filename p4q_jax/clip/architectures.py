"""CLIP architecture configs: the named OpenAI variants and (de)serialisation.

A config is plain frozen data (hashable, so a model built from it can be a static jit
argument). Converters infer it from checkpoint shapes; `NAMED` holds the released
variants for building a model from scratch.
"""

import dataclasses
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Image tower: a ViT (`layers` an int) or a ModifiedResNet (`layers` the four stage
    depths, `width` the stem width, `heads` the attention pool's heads; no patch size or MLP).
    """

    image_size: int
    patch_size: int | None = None
    width: int
    layers: int | tuple[int, int, int, int]
    heads: int
    mlp_dim: int | None = None

    def __post_init__(self):
        if isinstance(self.layers, list):  # from JSON
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.is_resnet:
            if len(self.layers) != 4 or self.patch_size is not None or self.mlp_dim is not None:
                raise ValueError(f"a ModifiedResNet config has 4 stage depths and no patch_size "
                                 f"or mlp_dim; got layers={self.layers}, patch_size="
                                 f"{self.patch_size}, mlp_dim={self.mlp_dim}")
            if self.image_size % 32:
                raise ValueError(f"a ModifiedResNet's image_size must be a multiple of 32 (its "
                                 f"total stride); got {self.image_size}")
        elif self.patch_size is None or self.mlp_dim is None:
            raise ValueError("a ViT config needs patch_size and mlp_dim")
        elif self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")

    @property
    def is_resnet(self) -> bool:
        return not isinstance(self.layers, int)

    @property
    def grid_size(self) -> int:
        """Side of the final feature map (patches for a ViT; the stride-32 map for a ResNet)."""
        return self.image_size // (32 if self.is_resnet else self.patch_size)

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1

    @property
    def feature_width(self) -> int:
        """Width of the tokens the final attention reads (a ResNet's last stage: 32 x stem)."""
        return 32 * self.width if self.is_resnet else self.width


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Causal text transformer; the feature is read at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int
    layers: int
    heads: int
    mlp_dim: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not supported; expected one of {ACTIVATIONS}"
            )
        for width, heads in ((self.vision.feature_width, self.vision.heads),
                             (self.text.width, self.text.heads)):
            if width % heads:
                raise ValueError(f"width {width} is not divisible by heads {heads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        return cls(
            vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d
        )


def vit(*, embed_dim, image_size, patch_size, vision_width, vision_layers, text_width,
        text_layers, context_length=77, vocab_size=49408, activation="quick_gelu"):
    """A ViT CLIP config following OpenAI's conventions (64-dim heads, 4x MLP)."""
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            width=vision_width,
            layers=vision_layers,
            heads=max(vision_width // 64, 1),
            mlp_dim=4 * vision_width,
        ),
        text=TextConfig(
            context_length=context_length,
            vocab_size=vocab_size,
            width=text_width,
            layers=text_layers,
            heads=max(text_width // 64, 1),
            mlp_dim=4 * text_width,
        ),
        activation=activation,
    )


def resnet(*, embed_dim, image_size, layers, vision_width, text_width, text_layers=12,
           context_length=77, vocab_size=49408):
    """A ModifiedResNet CLIP config following OpenAI's conventions (attention pool with
    64-dim heads over the 32 x `vision_width` last stage; text heads of 64)."""
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, width=vision_width, layers=tuple(layers),
                            heads=vision_width * 32 // 64),
        text=TextConfig(context_length=context_length, vocab_size=vocab_size, width=text_width,
                        layers=text_layers, heads=max(text_width // 64, 1),
                        mlp_dim=4 * text_width),
    )


NAMED = {
    "RN50": resnet(embed_dim=1024, image_size=224, layers=(3, 4, 6, 3), vision_width=64,
                   text_width=512),
    "RN101": resnet(embed_dim=512, image_size=224, layers=(3, 4, 23, 3), vision_width=64,
                    text_width=512),
    "RN50x4": resnet(embed_dim=640, image_size=288, layers=(4, 6, 10, 6), vision_width=80,
                     text_width=640),
    "RN50x16": resnet(embed_dim=768, image_size=384, layers=(6, 8, 18, 8), vision_width=96,
                      text_width=768),
    "RN50x64": resnet(embed_dim=1024, image_size=448, layers=(3, 15, 36, 10), vision_width=128,
                      text_width=1024),
    "ViT-B/32": vit(embed_dim=512, image_size=224, patch_size=32, vision_width=768,
                    vision_layers=12, text_width=512, text_layers=12),
    "ViT-B/16": vit(embed_dim=512, image_size=224, patch_size=16, vision_width=768,
                    vision_layers=12, text_width=512, text_layers=12),
    "ViT-L/14": vit(embed_dim=768, image_size=224, patch_size=14, vision_width=1024,
                    vision_layers=24, text_width=768, text_layers=12),
    "ViT-L/14@336px": vit(embed_dim=768, image_size=336, patch_size=14, vision_width=1024,
                          vision_layers=24, text_width=768, text_layers=12),
    # A small model for smoke runs and tests; not a released checkpoint.
    "tiny": vit(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                text_width=64, text_layers=2),
    # The same with a ModifiedResNet image tower (every stage kind: stride, downsample, pool).
    "tiny-rn": resnet(embed_dim=64, image_size=64, layers=(1, 2, 1, 1), vision_width=8,
                      text_width=64, text_layers=2),
}


def get_config(name: str) -> CLIPConfig:
    """Returns a named config (accepts OpenAI's `ViT-B/32` and open_clip's `ViT-B-32`)."""
    canonical = {k.replace("/", "-"): k for k in NAMED}
    key = canonical.get(name, name)
    if key not in NAMED:
        raise ValueError(f"unknown CLIP config {name!r}; known: {sorted(NAMED)}")
    return NAMED[key]
