"""P4Q against the alternatives a practitioner weighs, on the demo's task, with their costs.

    python main.py --config=configs/methods.py --workdir=runs/methods
    python main.py --config=configs/methods.py:w8a8 --workdir=runs/methods_w8a8

The demo (`configs/default.py`: the shipped tiny CLIP, `shapes_warm`, its recipe) at one bit
setting (`VARIANTS`, default `w4a4attn8`), every method in one process (one calibration,
shared through the demo's memo): FP zero-shot, CoOp-FP, PTQ, QwT (closed-form compensation of
the PTQ model), P4Q, QwT + P4Q (P4Q trained on the compensated model, variant `qwt_p4q`) and
QAT (the `qat` mode, `demo.qat`; a build without it refuses the run: add
`--config.demo.qat=False`). Writes the demo's results.json, results.md and results.png; every
row carries the cost columns (`p4q_jax/costs.py`). `experiments/sweep.py --preset=methods`
runs both bit settings over three seeds.
"""

from p4q_jax.configs import default

VARIANTS = ("w4a4attn8", "w8a8")  # the bit setting of the quantized methods
# The rows a run writes, in order (`p4q_jax/p4q/variants.py`'s row names).
METHODS = ("fp_zeroshot", "coop_fp", "ptq", "p4q", "qwt", "qwt_p4q", "qat")


def get_config(qconfig="w4a4attn8"):
    if qconfig not in VARIANTS:
        raise ValueError(f"methods: bit setting {qconfig!r} unknown; expected one of {VARIANTS}")
    config = default.get_config()
    config.demo.qconfigs = (qconfig,)
    config.demo.coop_fp = True
    config.demo.fp_p4q = False
    config.demo.ablations = ("qwt_p4q",)
    config.demo.ablation_qconfig = qconfig
    config.demo.qat = True
    return config
