"""Baselines in the P4Q code: `configs/baselines.py:VARIANT`, VARIANT one of `VARIANTS`.

* coop_fp: CoOp on the full-precision model (no quantization, no adapter, no distillation);
  the paper's reference point (ImageNet ViT-B/32: FP CoOp 64.70 vs 8-bit P4Q 66.94).
* coop_ptq: CoOp prompts on the PTQ model, without adapter or distillation.
* fp_p4q: prompts + adapter on the full-precision model (P4Q's ceiling without quantization).

What each changes: `p4q_jax/p4q/variants.py`.
"""

from p4q_jax.configs import p4q
from p4q_jax.p4q import variants

VARIANTS = tuple(variants.BASELINES)


def apply(config, variant):
    """`config` (a P4Q config, changed in place and returned) as the baseline `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"baseline {variant!r} unknown; expected one of {VARIANTS}")
    return variants.apply(config, variant)


def get_config(variant="coop_ptq"):
    return apply(p4q.get_config(), variant)
