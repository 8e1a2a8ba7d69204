"""CoOp's few-shot recipe on CLIP RN50, FP (CoOp) and with P4Q on top.

    python main.py --config=configs/coop_rn50.py:p4q_w8a8 \
        --config.model.checkpoint=RN50.pt --config.data.root=$DATA \
        --config.data.name=coop/caltech101 --config.data.num_shots=16 \
        --config.data.shot_seed=1 --workdir=runs/coop_rn50/caltech101/16shots/seed1

CoOp's `configs/trainers/CoOp/rn50*.yaml` are its `vit_b16*.yaml` with `BACKBONE.NAME: "RN50"`
and nothing else changed (the same SGD, batch, warm-up, per-epoch cosine, epochs per shots,
crops and flips), so the variants are `configs/coop_fewshot.py`'s with the RN50 architecture
(RN50 is CoOp's default backbone: the numbers of its paper's main figure). A checkpoint sets
the real architecture; `model.name` is what a run without one initialises randomly.
"""

from p4q_jax.configs import coop_fewshot

VARIANTS = coop_fewshot.VARIANTS


def get_config(variant="coop_fp"):
    config = coop_fewshot.get_config(variant)
    config.model.name = "RN50"
    return config
