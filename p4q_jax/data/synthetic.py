"""Generated images for the offline smoke run: no download, same for every run.

Each class has its own base colour (shared by both splits) plus per-image noise, so a model can
learn something from it and test accuracy above chance shows that training did something.
"""
import numpy as np

from p4q_jax.data import classnames

IMAGE_SIZE = 32
_SPLIT_SEEDS = {"train": 1, "test": 2}
_NOISE_STD = 40.0


def class_names(num_classes):
    """CIFAR-10's names, cycled with a number past ten ("airplane 2"), so all are distinct."""
    if num_classes < 1:
        raise ValueError(f"synthetic_classes must be at least 1, got {num_classes}.")
    base = classnames.CIFAR10_CLASSNAMES
    return tuple(
        base[i % len(base)] + (f" {i // len(base) + 1}" if i >= len(base) else "")
        for i in range(num_classes))


def examples(*, num_classes, num_examples, split):
    """Deterministic images and labels for one split.

    Args:
        num_classes: number of classes; labels are balanced (differ by at most one per class).
        num_examples: examples in the split.
        split: "train" or "test"; each has its own images.

    Returns:
        (images uint8 [num_examples, 32, 32, 3], labels int32 [num_examples]).
    """
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_SEEDS)}, got {split!r}.")
    if num_examples < 1:
        raise ValueError(f"synthetic_examples must be at least 1, got {num_examples}.")
    colours = np.random.default_rng(0).uniform(32, 224, (num_classes, 3))
    rng = np.random.default_rng(_SPLIT_SEEDS[split])
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    noise = rng.normal(0.0, _NOISE_STD, (num_examples, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = np.clip(np.round(colours[labels][:, None, None, :] + noise), 0, 255).astype(np.uint8)
    return images, labels
