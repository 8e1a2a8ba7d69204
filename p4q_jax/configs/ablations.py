"""P4Q ablations: `configs/ablations.py:VARIANT`, VARIANT one of `VARIANTS` (what each
changes: `p4q_jax/p4q/variants.py`). `kl_trained_teacher` needs
`--config.loss.teacher=PATH` (a trained FP export, e.g. an FP P4Q run's `export/`)."""

from p4q_jax.configs import p4q
from p4q_jax.p4q import variants

VARIANTS = tuple(variants.ABLATIONS)


def apply(config, variant):
    """`config` (a P4Q config, changed in place and returned) as the ablation `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"ablation {variant!r} unknown; expected one of {VARIANTS}")
    return variants.apply(config, variant)


def get_config(variant="prompts_only"):
    return apply(p4q.get_config(), variant)
