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
    """Image tower. `layers` is an int for a ViT (a tuple is reserved for ModifiedResNet)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1


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
        for tower in (self.vision, self.text):
            if tower.width % tower.heads:
                raise ValueError(f"width {tower.width} is not divisible by heads {tower.heads}")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"image_size {self.vision.image_size} is not a multiple of "
                f"patch_size {self.vision.patch_size}"
            )

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


NAMED = {
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
}


def get_config(name: str) -> CLIPConfig:
    """Returns a named config (accepts OpenAI's `ViT-B/32` and open_clip's `ViT-B-32`)."""
    canonical = {k.replace("/", "-"): k for k in NAMED}
    key = canonical.get(name, name)
    if key not in NAMED:
        raise ValueError(f"unknown CLIP config {name!r}; known: {sorted(NAMED)}")
    return NAMED[key]
