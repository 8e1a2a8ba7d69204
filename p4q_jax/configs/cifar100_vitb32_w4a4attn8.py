"""P4Q on CIFAR-100, ViT-B/32, a true 4-bit model: `w4a4attn8` (4-bit weights and activations
in both towers, 8-bit attention).

    python main.py --config=configs/cifar100_vitb32_w4a4attn8.py \
        --config.model.checkpoint=ViT-B-32.pt --config.data.data_dir=~/tensorflow_datasets \
        --workdir=runs/cifar100_vitb32_w4a4attn8

The public code's "4-4-8" quantizes 4-bit only the patch embedding and its input (the
`official` preset); its recipe, with its loss and staged schedule, is
`configs/cifar100_vitb32_official448.py`, and its numbers (PTQ 46.05, P4Q 69.20 top-1) are
not targets for this model. This config keeps that recipe's data, calibration (10 training
batches of 128 and the 100 x 18 zero-shot ensemble), batch and learning rates, with this
project's defaults elsewhere: KL distillation and one 50-epoch cosine.
"""

from p4q_jax.configs import p4q


def get_config():
    config = p4q.get_config()
    config.model.name = "ViT-B/32"
    config.data.name = "cifar100"
    return config
