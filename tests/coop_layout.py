"""Writes small CoOp data folders (`DATASETS.md` layouts) for tests: images, split files,
FGVC-Aircraft's variant lists, an ImageNet folder with classnames.txt, and few-shot pickles
written with a stand-in for Dassl's `Datum` (same module and class name, same state)."""

import json
import os
import pickle
import sys
import types

import numpy as np
import PIL.Image


def write_image(path, seed, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path, format="JPEG")


def split_dataset(root, directory, images, split_file, class_names, per_split, *, seed=0):
    """`root/directory/images/<class>/<i>.jpg` and a split file listing them.

    `per_split`: {"train"|"val"|"test": images per class}, or {split: [count per class]}.
    Entries are interleaved across classes (as CoOp's split files are not grouped), so
    "first appearance" order differs from label order. Returns the split dict written.
    """
    dataset_dir = root / directory
    split = {}
    n = 0
    for name, counts in per_split.items():
        counts = counts if isinstance(counts, list) else [counts] * len(class_names)
        entries = []
        for i in range(max(counts)):
            for label in reversed(range(len(class_names))):  # labels appear last-first
                if i < counts[label]:
                    folder = class_names[label].replace(" ", "_")
                    rel = f"{folder}/{name}_{i}.jpg"
                    write_image(dataset_dir / images / rel, seed + n)
                    n += 1
                    entries.append([rel, label, class_names[label]])
        split[name] = entries
    (dataset_dir / split_file).write_text(json.dumps(split))
    return split


def fgvc_aircraft(root, variants, per_split):
    """`fgvc_aircraft/{variants.txt, images_variant_<split>.txt, images/<id>.jpg}`."""
    dataset_dir = root / "fgvc_aircraft"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "variants.txt").write_text("".join(v + "\n" for v in variants))
    image_id = 1000000
    for split, count in per_split.items():
        lines = []
        for i in range(count):
            for variant in variants:
                image_id += 1
                write_image(dataset_dir / "images" / f"{image_id}.jpg", image_id)
                lines.append(f"{image_id} {variant}\n")
        (dataset_dir / f"images_variant_{split}.txt").write_text("".join(lines))


def imagenet(root, folders, names, per_split):
    """`imagenet/images/{train,val}/<wnid>/*.JPEG` and `imagenet/classnames.txt`."""
    dataset_dir = root / "imagenet"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "classnames.txt").write_text(
        "".join(f"{f} {n}\n" for f, n in zip(folders, names)))
    seed = 0
    for split, count in per_split.items():
        for folder in folders:
            for i in range(count):
                seed += 1
                write_image(dataset_dir / "images" / split / folder / f"{folder}_{i}.JPEG", seed)


class _Datum:
    """Stands in for Dassl's Datum: same state, pickled under Dassl's module and class name."""

    def __init__(self, impath, label, classname, domain=0):
        self._impath, self._label = impath, label
        self._domain, self._classname = domain, classname


_DASSL_MODULE = "dassl.data.datasets.base_dataset"


def fewshot_pickle(path, lists):
    """CoOp's `split_fewshot/shot_<k>-seed_<s>.pkl`: {key: [Datum(abs path, label, name)]}."""
    obj = {key: [_Datum(*item) for item in items] for key, items in lists.items()}
    # pickle looks the class up by its module path, so the dassl modules exist while it runs.
    names = ("dassl", "dassl.data", "dassl.data.datasets", _DASSL_MODULE)
    modules = {name: types.ModuleType(name) for name in names if name not in sys.modules}
    sys.modules.update(modules)
    saved = _Datum.__module__, _Datum.__qualname__
    _Datum.__module__, _Datum.__qualname__ = _DASSL_MODULE, "Datum"
    sys.modules[_DASSL_MODULE].Datum = _Datum
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        _Datum.__module__, _Datum.__qualname__ = saved
        for name in modules:
            del sys.modules[name]
