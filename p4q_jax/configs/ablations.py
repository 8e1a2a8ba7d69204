"""P4Q ablations: `configs/ablations.py:VARIANT`, VARIANT one of
prompts_only | adapter_only | no_distillation.

* prompts_only: learned prompts with distillation, no adapter.
* adapter_only: the adapter with distillation; the context fixed at "a photo of a".
* no_distillation: prompts + adapter, cross-entropy only.
"""

from p4q_jax.configs import p4q

VARIANTS = ("prompts_only", "adapter_only", "no_distillation")


def get_config(variant="prompts_only"):
    if variant not in VARIANTS:
        raise ValueError(f"ablation {variant!r} unknown; expected one of {VARIANTS}")
    config = p4q.get_config()
    config.p4q.method = f"p4q_{variant}"
    if variant == "prompts_only":
        config.p4q.adapter = False
    elif variant == "adapter_only":
        config.p4q.ctx_init = "a photo of a"
        config.p4q.train_prompts = False
    else:
        config.loss.distillation_kind = "none"
        config.loss.distillation = 0.0
    return config
