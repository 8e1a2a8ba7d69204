"""The default job (`python main.py`): the offline P4Q demo on the shipped tiny CLIP.

Loads the CLIP that `experiments/tiny_clip/pretrain.py` pretrained on rendered shapes (shipped in
`p4q_jax/assets/`), evaluates it zero-shot on the shapes test split, then for each bit setting in
`demo.qconfigs` calibrates it (PTQ) and trains P4Q (prompts + 8-bit adapter, distilled from the
FP model) on the train split. Prints the FP / PTQ / P4Q table and writes `results.json`,
`results.md` and `results.png` to the workdir (one sub-directory per setting holds that run's
own results, curves, checkpoints and export). Nothing is downloaded.
"""

from p4q_jax.configs import p4q
from p4q_jax import assets


def get_config():
    config = p4q.get_config()
    config.mode = "demo"
    config.demo = {"qconfigs": ("w8a8", "w4a4attn8")}

    config.model.checkpoint = str(assets.TINY_CLIP)
    config.data.name = "shapes"
    config.data.num_shots = 0  # the whole train split (100 per class), as P4Q does on CIFAR
    config.eval.batch_size = 200
    config.eval.text_batch_size = 200
    config.quant.calib_batches = 4
    config.quant.calib_batch_size = 64

    config.train.batch_size = 128
    config.train.num_steps = 2000
    config.train.prompt_lr = 2e-3
    config.train.adapter_lr = 1e-2
    config.train.log_every = 100
    # The tiny CLIP's features have 64 dimensions: the paper's 4x bottleneck would leave 16.
    config.p4q.adapter_reduction = 1
    config.p4q.adapter_ratio = 0.5
    config.p4q.adapter_calib_batches = 8
    config.checkpoint.every_steps = 500
    return config
