"""Named variants of the P4Q recipe: the baselines and ablations the paper reports.

Each variant changes a few fields of a P4Q config and names its results row:

Baselines (row = the variant's name):
* coop_fp: CoOp on the full-precision model (learned prompts only, no distillation).
* coop_ptq: CoOp's prompts on the PTQ model, no adapter, no distillation.
* fp_p4q: prompts + adapter with the config's distillation on the FP model: the method
  without quantization (its ceiling), and a teacher that knows the task.
* qwt_p4q: P4Q trained on the QwT-compensated PTQ model (`quant.compensation="qwt"`): the
  run also reports QwT's row, and its export keeps the compensation.

Ablations (row = "p4q_" + the variant's name), which parts train and the distillation:
* prompts_only / adapter_only: learned prompts without the adapter, or the adapter with the
  context fixed at "a photo of a"; the config's distillation.
* prompts_only_no_distillation, adapter_only_no_distillation, no_distillation (both
  parts): cross-entropy only.
* kl_distillation: both parts, KL from the FP zero-shot teacher (the paper's text).
* kl_trained_teacher: both parts, KL from a trained FP export; `loss.teacher` is left unset
  for the caller to give (the demo passes its FP P4Q run's export).
"""

FIXED_CONTEXT = "a photo of a"
_NO_DISTILLATION = {"loss.distillation_kind": "none", "loss.distillation": 0.0}
_FIXED_PROMPT = {"p4q.ctx_init": FIXED_CONTEXT, "p4q.train_prompts": False}

BASELINES = {
    "coop_fp": {"p4q.quantize": False, "p4q.adapter": False, **_NO_DISTILLATION},
    "coop_ptq": {"p4q.adapter": False, **_NO_DISTILLATION},
    "fp_p4q": {"p4q.quantize": False},
    "qwt_p4q": {"quant.compensation": "qwt"},
}
ABLATIONS = {
    "prompts_only": {"p4q.adapter": False},
    "adapter_only": dict(_FIXED_PROMPT),
    "prompts_only_no_distillation": {"p4q.adapter": False, **_NO_DISTILLATION},
    "adapter_only_no_distillation": {**_FIXED_PROMPT, **_NO_DISTILLATION},
    "no_distillation": dict(_NO_DISTILLATION),
    "kl_distillation": {"loss.distillation_kind": "kl", "loss.teacher": "zeroshot"},
    "kl_trained_teacher": {"loss.distillation_kind": "kl", "loss.teacher": None},
}


def row_name(variant):
    """The results row a variant's run reports."""
    return variant if variant in BASELINES else f"p4q_{variant}"


def apply(config, variant):
    """`config` (a P4Q config, changed in place and returned) as `variant`."""
    changes = BASELINES.get(variant, ABLATIONS.get(variant))
    if changes is None:
        raise ValueError(f"variant {variant!r} unknown; expected one of "
                         f"{sorted(BASELINES) + sorted(ABLATIONS)}")
    config.p4q.method = row_name(variant)
    for dotted, value in changes.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


# The one name of each kind of results row, in every table (main.py's and the sweep's).
_ROW_LABELS = {"fp_zeroshot": "FP zero-shot", "coop_fp": "CoOp-FP", "coop_ptq": "CoOp-PTQ",
               "fp_p4q": "FP P4Q", "ptq": "PTQ", "qwt": "QwT", "p4q": "P4Q",
               "qwt_p4q": "QwT + P4Q", "qat": "QAT"}


def row_label(method):
    """A results row's name in tables: "P4Q", "CoOp-FP", ..., "P4Q: prompts only" for an
    ablation's row (`ABLATIONS`), the row's own name otherwise (a config's own method)."""
    if method in _ROW_LABELS:
        return _ROW_LABELS[method]
    variant = method.removeprefix("p4q_")
    if method.startswith("p4q_") and variant in ABLATIONS:
        return "P4Q: " + variant.replace("_", " ")
    return method
