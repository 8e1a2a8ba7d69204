"""The default job (`python main.py`): the offline P4Q demo on the shipped tiny CLIP.

Loads the CLIP that `experiments/tiny_clip/pretrain.py` pretrained on rendered shapes (shipped in
`p4q_jax/assets/`) and adapts it to a downstream task it was not pretrained on: the same classes
photographed under warm light (`shapes_warm`, see `p4q_jax/data/shapes.py`). It evaluates the FP
model zero-shot, trains CoOp's prompts on the FP model (CoOp-FP), then for each bit setting in
`demo.qconfigs` calibrates it (PTQ) and trains P4Q (prompts + 8-bit adapter, distilled from the
FP model) on the train split. Prints the table and writes `results.json`, `results.md` and
`results.png` to the workdir (one sub-directory per run holds that run's own results, curves,
checkpoints and export). Nothing is downloaded.

`configs/default.py:grid` is the demo with FP P4Q and every ablation of its 4-bit P4Q
(`p4q_jax/p4q/variants.py`: which parts train x the distillation, and KL from the FP P4Q
run as a teacher that knows the task), run in one process that calibrates each bit setting
once; `configs/default.py:shapes_control` compares the distillations on the unshifted
`shapes` task, where the FP zero-shot teacher is good. `configs/default.py:VARIANT` is one
ablation of the demo's 4-bit P4Q as a single `p4q` run. `experiments/sweep.py
--preset=demo` runs the grid and the control over three seeds.
"""

from p4q_jax import assets
from p4q_jax.configs import ablations
from p4q_jax.configs import p4q

# The bits the ablations run at (the paper's are at 4 bits): the schema's default.
ABLATION_QCONFIG = p4q.get_config().demo.ablation_qconfig
# The demo's grid: which parts train x {none, the default (official)}, and for both parts KL
# from the zero-shot and from the trained FP teacher (`p4q_jax/p4q/variants.py`).
GRID = ("prompts_only", "prompts_only_no_distillation", "adapter_only",
        "adapter_only_no_distillation", "no_distillation", "kl_distillation",
        "kl_trained_teacher")


def get_config(variant=None):
    config = p4q.get_config()
    config.mode = "demo"
    # The demo section's defaults (p4q_jax/schema.py): FP zero-shot, CoOp-FP, then PTQ and P4Q
    # at w8a8 and w4a4attn8; no ablations.

    config.model.checkpoint = str(assets.TINY_CLIP)
    config.data.name = "shapes_warm"
    config.eval.batch_size = 200
    config.eval.text_batch_size = 200
    config.quant.calib_batches = 4
    config.quant.calib_batch_size = 64

    config.train.num_steps = 2000
    config.train.prompt_lr = 2e-3
    config.train.adapter_lr = 1e-2
    config.train.log_every = 100
    # The tiny CLIP's features have 64 dimensions: the paper's 4x bottleneck would leave 16.
    config.p4q.adapter_reduction = 1
    config.p4q.adapter_ratio = 0.5
    config.p4q.adapter_calib_batches = 8
    if variant == "grid":
        config.demo.fp_p4q = True
        config.demo.ablations = GRID
    elif variant == "shapes_control":
        config.data.name = "shapes"
        config.demo.qconfigs = (ABLATION_QCONFIG,)
        config.demo.coop_fp = False
        config.demo.ablations = ("no_distillation", "kl_distillation")
    elif variant is not None:
        config.mode = "p4q"
        config.quant.config = ABLATION_QCONFIG
        ablations.apply(config, variant)
    return config
