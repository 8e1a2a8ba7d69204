"""Baselines in the P4Q code: `configs/baselines.py:coop_fp` or `configs/baselines.py:coop_ptq`.

* coop_fp: CoOp on the full-precision model (no quantization, no adapter, no distillation);
  the paper's reference point (ImageNet ViT-B/32: FP CoOp 64.70 vs 8-bit P4Q 66.94).
* coop_ptq: CoOp prompts on the PTQ model, without adapter or distillation.

`apply` turns any P4Q config into a baseline (the demo's CoOp-FP row uses it).
"""

from p4q_jax.configs import p4q

VARIANTS = ("coop_fp", "coop_ptq")


def apply(config, variant):
    """`config` (a P4Q config, changed in place and returned) as the baseline `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"baseline {variant!r} unknown; expected one of {VARIANTS}")
    config.p4q.method = variant
    config.p4q.adapter = False
    config.loss.distillation_kind = "none"
    config.loss.distillation = 0.0
    config.p4q.quantize = variant == "coop_ptq"
    return config


def get_config(variant="coop_ptq"):
    return apply(p4q.get_config(), variant)
