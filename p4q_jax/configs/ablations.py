"""P4Q ablations: `configs/ablations.py:VARIANT`, VARIANT one of
prompts_only | adapter_only | no_distillation | official_distillation.

* prompts_only: learned prompts with distillation, no adapter.
* adapter_only: the adapter with distillation; the context fixed at "a photo of a".
* no_distillation: prompts + adapter, cross-entropy only.
* official_distillation: prompts + adapter with the public code's distillation
  (`cross_entropy(teacher_probs, student_probs)`) instead of KL.

`apply` turns any P4Q config into a variant (the demo's ablations: `configs/default.py:VARIANT`).
"""

from p4q_jax.configs import p4q

VARIANTS = ("prompts_only", "adapter_only", "no_distillation", "official_distillation")


def apply(config, variant):
    """`config` (a P4Q config, changed in place and returned) as the ablation `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"ablation {variant!r} unknown; expected one of {VARIANTS}")
    config.p4q.method = f"p4q_{variant}"
    if variant == "prompts_only":
        config.p4q.adapter = False
    elif variant == "adapter_only":
        config.p4q.ctx_init = "a photo of a"
        config.p4q.train_prompts = False
    elif variant == "no_distillation":
        config.loss.distillation_kind = "none"
        config.loss.distillation = 0.0
    else:
        config.loss.distillation_kind = "official"
    return config


def get_config(variant="prompts_only"):
    return apply(p4q.get_config(), variant)
