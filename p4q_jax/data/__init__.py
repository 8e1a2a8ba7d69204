"""Datasets for P4Q: TFDS pipelines, image folders, CoOp's datasets, synthetic data, prompts.

    info = data.get_info("cifar100")
    texts = data.prompts(info.class_names, info.templates)   # [100][18] strings
    ds = data.create_dataset(config.data, split="train", batch_size=128, image_size=224, train=True)
    for batch in data.as_numpy_batches(ds): ...              # {"image", "label", "mask"}
    d = data.coop.load("/data", "oxford_pets", num_shots=16, seed=1)  # CoOp's lists
"""

import importlib

from p4q_jax.data import classnames
from p4q_jax.data import coop
from p4q_jax.data.registry import AUGMENTATIONS
from p4q_jax.data.registry import NAMES
from p4q_jax.data.registry import DatasetInfo
from p4q_jax.data.registry import get_info
from p4q_jax.data.registry import info_from_config
from p4q_jax.data.registry import prompts

# The input pipeline imports TensorFlow (5 s); it loads on first use, so that a config's
# errors (preflight, which needs only the registry) are reported before that wait.
_PIPELINE = ("as_numpy_batches", "create_dataset", "in_the_foreground", "num_eval_batches",
             "num_examples", "training_examples")


def __getattr__(name):
    if name in _PIPELINE:
        return getattr(importlib.import_module("p4q_jax.data.input_pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PIPELINE])
