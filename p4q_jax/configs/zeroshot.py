"""Zero-shot evaluation of a CLIP checkpoint with CLIP's prompt ensembles.

    python main.py --config=configs/zeroshot.py --config.model.checkpoint=ViT-B-32.pt \
        --config.data.name=cifar100 --workdir=runs/zeroshot_cifar100
"""

from p4q_jax.configs import base


def get_config():
    config = base.get_config()
    config.model.name = "ViT-B/32"
    config.data.name = "cifar100"
    config.eval.batch_size = 256
    config.eval.text_batch_size = 256
    return config
