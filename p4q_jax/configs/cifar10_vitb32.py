"""P4Q on CIFAR-10, ViT-B/32, at the bit width given by the variant:
`configs/cifar10_vitb32.py:w4a4attn8` (default), `:w8a8` or `:official`.

    python main.py --config=configs/cifar10_vitb32.py:w8a8 \
        --config.model.checkpoint=ViT-B-32.pt --workdir=runs/cifar10_vitb32_w8a8

The CIFAR-100 recipe (`configs/cifar100_vitb32_w4a4attn8.py`) on CIFAR-10's 10 classes and
18-template ensemble. No public P4Q number for CIFAR-10 was verified for this project, so
the reference points are the run's own FP zero-shot and PTQ rows in results.json.
"""

from p4q_jax.configs import cifar100_vitb32_w4a4attn8

VARIANTS = ("w4a4attn8", "w8a8", "official")


def get_config(variant="w4a4attn8"):
    if variant not in VARIANTS:
        raise ValueError(f"bit setting {variant!r} unknown; expected one of {VARIANTS}")
    config = cifar100_vitb32_w4a4attn8.get_config()
    config.data.name = "cifar10"
    config.quant.config = variant
    return config
