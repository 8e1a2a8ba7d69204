"""P4Q on CIFAR-100, ViT-B/32, the public code's "4-4-8" recipe and hyper-parameters.

    python main.py --config=configs/cifar100_vitb32_w4a4attn8.py \
        --config.model.checkpoint=ViT-B-32.pt --config.data.data_dir=~/tensorflow_datasets \
        --workdir=runs/cifar100_vitb32_448

Targets the public P4Q numbers (github.com/HuixinSun/P4Q_official, CIFAR-100, ViT-B/32):
FP zero-shot 65.34 top-1, PTQ (OMSE) 46.05, P4Q 69.20. Recipe: the `official` preset
(what that code quantizes for "4-4-8": 4-bit patch embedding and its input, 8-bit
elsewhere; see p4q_jax/quant/qconfig.py), calibration on 10 training batches of 128 and
the 100 x 18 zero-shot ensemble, the full training set, batch 128, 50 epochs, flips,
prompts SGD 5e-4 x 128 / 20 with cosine, adapter AdamW 1e-3 (eps 1e-4) with cosine.
`--config.quant.config=w4a4attn8` runs a true 4-bit model instead.
"""

from p4q_jax.configs import p4q


def get_config():
    config = p4q.get_config()
    config.model.name = "ViT-B/32"
    config.data.name = "cifar100"
    config.quant.config = "official"
    config.quant.calib_batches = 10
    config.quant.calib_batch_size = 128
    config.train.batch_size = 128
    config.train.epochs = 50
    config.data.num_shots = 0
    return config
