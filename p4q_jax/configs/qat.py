"""QAT baseline: the whole quantized CLIP fine-tuned with learned step sizes (LSQ) plus CoOp
prompts, with P4Q's loss, data, augmentation and step budget (`p4q_jax/qat.py`).

    python main.py --config=configs/qat.py --config.model.checkpoint=ViT-B-32.pt \
        --config.data.name=cifar100 --config.quant.config=w4a4attn8 --workdir=runs/qat

Writes results.json (FP zero-shot, PTQ and QAT rows; the QAT row has `trainable_params`),
training_curves.png, checkpoints/ (a rerun resumes) and export/ (the trained towers as
integer kernels with the learned steps, and the prompts; `--mode=eval` reads it).
"""

from p4q_jax.configs import p4q


def get_config():
    config = p4q.get_config()
    config.mode = "qat"
    config.p4q.method = "qat"  # the row name in results.json
    config.p4q.adapter = False  # QAT trains the towers and the prompts, no adapter
    return config
