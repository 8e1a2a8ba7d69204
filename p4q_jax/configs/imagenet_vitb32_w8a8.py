"""P4Q on ImageNet, ViT-B/32, 8-bit (W8A8, 8-bit attention).

    python main.py --config=configs/imagenet_vitb32_w8a8.py \
        --config.model.checkpoint=ViT-B-32.pt --config.data.manual_dir=/data/imagenet \
        --workdir=runs/imagenet_vitb32_w8a8

Targets the paper's ImageNet ViT-B/32 result: 8-bit P4Q 66.94 top-1, above the
full-precision CoOp baseline's 64.70 (`configs/baselines.py:coop_fp` with this dataset).
The public code has no ImageNet recipe; this config assumes CoOp's ImageNet protocol
(16 shots per class, 50 epochs) with P4Q's batch, learning rates and calibration
(those of `configs/cifar100_vitb32_w4a4attn8.py`). ImageNet is prepared
from `manual_dir` (TFDS never downloads it here). The feature cache (1.28M images x 2
views x 2 towers would be ~10 GB for the full set) is kept on disk in the workdir.
"""

from p4q_jax.configs import cifar100_vitb32_w4a4attn8


def get_config():
    config = cifar100_vitb32_w4a4attn8.get_config()  # the same recipe and hyper-parameters
    config.data.name = "imagenet2012"
    config.data.num_shots = 16
    config.quant.config = "w8a8"
    config.eval.batch_size = 256
    return config
