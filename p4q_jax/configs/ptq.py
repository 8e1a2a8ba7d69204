"""Post-training quantization: calibrate, then zero-shot FP and PTQ on the test split.

    python main.py --config=configs/ptq.py --config.model.checkpoint=ViT-B-32.pt \
        --config.data.name=cifar100 --config.quant.config=w4a4attn8 --workdir=runs/ptq

The image tower is calibrated on `quant.calib_batches` training batches, the text tower
on the dataset's zero-shot prompt ensemble (as the public P4Q code does: 10 batches of
128 images, 100 classes x 18 templates for CIFAR-100).
"""

from p4q_jax.configs import zeroshot


def get_config():
    config = zeroshot.get_config()
    config.mode = "ptq"
    config.quant.calib_batches = 10
    config.quant.calib_batch_size = 128
    return config
