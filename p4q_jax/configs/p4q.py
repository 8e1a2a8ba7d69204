"""P4Q: calibrate (PTQ), then train learned prompts + an 8-bit QAdapter with distillation
from the FP teacher (the public code's loss by default).

    python main.py --config=configs/p4q.py --config.model.checkpoint=ViT-B-32.pt \
        --config.data.name=cifar100 --config.quant.config=w4a4attn8 --workdir=runs/p4q

Writes results.json (FP zero-shot, PTQ and P4Q rows), training_curves.png, TensorBoard
logs, checkpoints/ (a rerun with the same workdir resumes) and export/ (the trained
model, for `--mode=eval` and `p4q.classifier.load`). Baselines and ablations are variants:
`configs/baselines.py:coop_fp`, `configs/ablations.py:adapter_only`, ...
"""

from p4q_jax.configs import ptq


def get_config():
    # The p4q, train, loss, speed and checkpoint sections' defaults (p4q_jax/schema.py) are
    # the method's recipe.
    config = ptq.get_config()
    config.mode = "p4q"
    return config
