"""CoOp's and Dassl's data rules, reimplemented for the tests from their public code
(KaiyangZhou/CoOp `datasets/oxford_pets.py`, KaiyangZhou/Dassl.pytorch `base_dataset.py`),
on (impath, label, classname) tuples and with Python's global `random`, as there."""

import collections
import math
import os
import random


def dassl_fewshot(items, num_shots):
    """Dassl's `DatasetBase.generate_fewshot_dataset` (repeat=False), global `random`."""
    tracker = collections.defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    dataset = []
    for _, group in tracker.items():
        dataset.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return dataset


def coop_lists(split, image_dir, num_shots, seed):
    """What CoOp's OxfordPets(cfg) holds: read_split, then set_random_seed's random.seed
    followed by the two few-shot draws (train, then val with min(k, 4))."""
    state = random.getstate()
    try:
        random.seed(seed)
        lists = {k: [(os.path.join(image_dir, p), y, c) for p, y, c in split[k]]
                 for k in ("train", "val", "test")}
        lists["train"] = dassl_fewshot(lists["train"], num_shots)
        lists["val"] = dassl_fewshot(lists["val"], min(num_shots, 4))
        return lists
    finally:
        random.setstate(state)


def coop_subsample(lists, subsample):
    """CoOp's OxfordPets.subsample_classes."""
    if subsample == "all":
        return lists
    labels = sorted({item[1] for item in lists[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return [[(i, relabeler[y], c) for i, y, c in items if y in selected] for items in lists]
