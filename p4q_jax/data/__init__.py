"""Datasets for P4Q: TFDS input pipelines, image folders, synthetic data, class names and templates.

    info = data.get_info("cifar100")
    texts = data.prompts(info.class_names, info.templates)   # [100][18] strings
    ds = data.create_dataset(config.data, split="train", batch_size=128, image_size=224, train=True)
    for batch in data.as_numpy_batches(ds): ...              # {"image", "label", "mask"}
"""

from p4q_jax.data import classnames
from p4q_jax.data.input_pipeline import as_numpy_batches
from p4q_jax.data.input_pipeline import create_dataset
from p4q_jax.data.input_pipeline import num_eval_batches
from p4q_jax.data.input_pipeline import num_examples
from p4q_jax.data.registry import NAMES
from p4q_jax.data.registry import DatasetInfo
from p4q_jax.data.registry import get_info
from p4q_jax.data.registry import info_from_config
from p4q_jax.data.registry import prompts
