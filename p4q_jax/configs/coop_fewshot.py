"""CoOp's few-shot protocol: its recipe on CoOp's datasets, FP (CoOp) and with P4Q on top.

    python main.py --config=configs/coop_fewshot.py:coop_fp \
        --config.model.checkpoint=ViT-B-16.pt --config.data.root=$DATA \
        --config.data.name=coop/oxford_pets --config.data.num_shots=16 \
        --config.data.shot_seed=1 --workdir=runs/coop/oxford_pets/16shots/seed1

Variants (`configs/coop_fewshot.py:<variant>`):

* coop_fp: CoOp (`scripts/coop/main.sh DATASET vit_b16* end 16 SHOTS False`): 16 learned
  context tokens before the class name, shared by all classes, N(0, 0.02) initialised; SGD at
  0.002 with momentum 0.9 and weight decay 5e-4, batch 32, one warm-up epoch at 1e-5, then
  cosine per epoch over CoOp's epochs for the shots (1: 50, 2 and 4: 100, 8 and 16: 200;
  ImageNet: 50); random resized crops + flips; the FP model, no adapter, no distillation.
  results.json holds the FP zero-shot row (CoOp's single template) and the CoOp row.
* p4q_w8a8, p4q_w4a4attn8: the same recipe on the PTQ model (calibrated on the few-shot
  training images) with P4Q's QAdapter and distillation from the FP CLIP; results.json holds
  FP zero-shot, PTQ and P4Q rows.

Few-shot subsets are CoOp's (`data.coop`), so the numbers sit in one table with CoOp's.
`sweeps/coop_fewshot.py` runs the whole table.
"""

from p4q_jax.configs import p4q

VARIANTS = ("coop_fp", "p4q_w8a8", "p4q_w4a4attn8")


def get_config(variant="coop_fp"):
    if variant not in VARIANTS:
        raise ValueError(f"coop_fewshot variant {variant!r} unknown; expected one of {VARIANTS}")
    config = p4q.get_config()
    config.model.name = "ViT-B/16"  # CoOp's vit_b16 configs; a checkpoint sets the real one
    config.data.name = "coop/oxford_pets"
    config.data.num_shots = 16
    config.data.shot_seed = 1
    config.data.augment = "coop"
    config.eval.batch_size = 96  # CoOp tests in batches of 100; a multiple of 8 devices here
    config.quant.calib_batch_size = 32
    config.quant.calib_batches = 4

    config.train.batch_size = 32
    config.train.prompt_lr = 0.002
    config.train.prompt_momentum = 0.9
    config.train.prompt_weight_decay = 5e-4
    config.train.schedule = "coop"
    config.train.epochs_from_shots = True
    config.p4q.adapter_calib_batches = 4

    config.p4q.method = variant
    if variant == "coop_fp":
        config.p4q.quantize = False
        config.p4q.adapter = False
        config.loss.distillation = 0.0
        config.loss.distillation_kind = "none"
    else:
        config.quant.config = variant.removeprefix("p4q_")
    return config
