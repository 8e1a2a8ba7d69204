"""CoOp's datasets as CoOp reads them: its folder layouts, fixed splits and few-shot subsets.

Prompt-learning results (CoOp, CoCoOp, MaPLe, P4Q) are comparable only when they train and test
on the same images. This module reads a `$DATA` folder laid out as CoOp's `DATASETS.md` says
(public repo KaiyangZhou/CoOp) and returns the train, val and test lists that CoOp's
`datasets/*.py` and Dassl's `DatasetBase` build from it, in the same order:

    d = data.coop.load("/data", "oxford_pets", num_shots=16, seed=1)
    d.train[0]        # Record(impath='/data/oxford_pets/images/...jpg', label=.., classname=..)
    d.class_names     # label -> name, underscores as spaces (what goes into a prompt)

- Splits: the `split_zhou_<Name>.json` files CoOp publishes (`{"train"|"val"|"test":
  [[path relative to the image folder, label, classname], ...]}`); FGVC-Aircraft's
  `images_variant_{train,val,test}.txt` with `variants.txt`; ImageNet's `images/{train,val}`
  class folders with `classnames.txt` (val is the test set and the val set, as in CoOp), or
  CoOp's `preprocessed.pkl` of them where present.
- Few-shot subsets (`num_shots` >= 1): CoOp's cached `split_fewshot/shot_<k>-seed_<s>.pkl`
  when present (what published runs trained on), read by an allow-list unpickler that accepts
  Dassl's `Datum` and nothing else; otherwise drawn exactly as CoOp does: Python's `random`
  seeded with `seed`, then Dassl's `generate_fewshot_dataset` on train (k per class) and on val
  (min(k, 4) per class): classes in order of first appearance, `random.sample` per class, all
  of a class's images where it has no more than k. Nothing is written to the data folder.
- Class names: Dassl's label -> name map of the training list, with CoOp's "_" -> " ".

Reading is pure Python (no TensorFlow): `preflight` calls it to check a config's data.
"""

import dataclasses
import functools
import io
import json
import os
import pickle
import random

from absl import logging

from p4q_jax.data import classnames
from p4q_jax.data import clip_templates
from p4q_jax.data import folder as folder_lib

_DATASETS_MD = "DATASETS.md of github.com/KaiyangZhou/CoOp"
TEMPLATE_CHOICES = ("coop", "clip")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Where one dataset's files are (relative to `$DATA`) and its prompt templates.

    Attributes:
        directory: the dataset's folder under `$DATA`.
        images: the image folder in it, which split-file paths are relative to ("" for itself).
        split_file: the `split_zhou_*.json` in `directory`; None for FGVC-Aircraft and ImageNet.
        section: the section of CoOp's DATASETS.md that explains how to get the files.
        coop_template: CoOp's single template (`trainers/zsclip.py`, its zero-shot CLIP rows).
        clip_templates: CLIP's ensemble for the dataset.
    """

    directory: str
    images: str
    split_file: str | None
    section: str
    coop_template: tuple
    clip_templates: tuple


_SPECS = {
    "imagenet": _Spec("imagenet", "images", None, "ImageNet",
                      classnames.PHOTO_TEMPLATES, classnames.IMAGENET_TEMPLATES),
    "caltech101": _Spec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                        "Caltech101", classnames.PHOTO_TEMPLATES, clip_templates.CALTECH101),
    "oxford_pets": _Spec("oxford_pets", "images", "split_zhou_OxfordPets.json", "OxfordPets",
                         classnames.PET_TEMPLATES, clip_templates.OXFORD_PETS),
    "stanford_cars": _Spec("stanford_cars", "", "split_zhou_StanfordCars.json", "StanfordCars",
                           classnames.PHOTO_TEMPLATES, clip_templates.STANFORD_CARS),
    "oxford_flowers": _Spec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                            "Flowers102", classnames.FLOWER_TEMPLATES, clip_templates.FLOWERS102),
    "food101": _Spec("food-101", "images", "split_zhou_Food101.json", "Food101",
                     classnames.FOOD_TEMPLATES, clip_templates.FOOD101),
    "fgvc_aircraft": _Spec("fgvc_aircraft", "images", None, "FGVCAircraft",
                           classnames.AIRCRAFT_TEMPLATES, clip_templates.FGVC_AIRCRAFT),
    "sun397": _Spec("sun397", "SUN397", "split_zhou_SUN397.json", "SUN397",
                    classnames.PHOTO_TEMPLATES, clip_templates.SUN397),
    "dtd": _Spec("dtd", "images", "split_zhou_DescribableTextures.json", "DTD",
                 classnames.TEXTURE_TEMPLATES, clip_templates.DTD),
    "eurosat": _Spec("eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT",
                     classnames.SATELLITE_TEMPLATES, clip_templates.EUROSAT),
    "ucf101": _Spec("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "UCF101",
                    classnames.ACTION_TEMPLATES, clip_templates.UCF101),
    # ImageNet's test-only variants (domain generalization), read as CoOp's imagenet*.py.
    "imagenetv2": _Spec("imagenetv2", "imagenetv2-matched-frequency-format-val", None,
                        "ImageNetV2", classnames.PHOTO_TEMPLATES, classnames.IMAGENET_TEMPLATES),
    "imagenet_sketch": _Spec("imagenet-sketch", "images", None, "ImageNet-Sketch",
                             classnames.PHOTO_TEMPLATES, classnames.IMAGENET_TEMPLATES),
    "imagenet_a": _Spec("imagenet-adversarial", "imagenet-a", None, "ImageNet-A",
                        classnames.PHOTO_TEMPLATES, classnames.IMAGENET_TEMPLATES),
    "imagenet_r": _Spec("imagenet-rendition", "imagenet-r", None, "ImageNet-R",
                        classnames.PHOTO_TEMPLATES, classnames.IMAGENET_TEMPLATES),
}
NAMES = tuple(_SPECS)
# Test-only sets: no training or val list (CoOp's train_x is the test list); no few-shot draw.
TEST_ONLY = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
SUBSAMPLES = ("all", "base", "new")
PREFIX = "coop/"  # config.data.name = "coop/<name>"


class DataError(ValueError):
    """A CoOp data folder that cannot be read as CoOp reads it; the message names the file."""


class Record(tuple):
    """One image as Dassl's `Datum` holds it: (impath, label, classname), impath absolute."""

    __slots__ = ()

    def __new__(cls, impath, label, classname):
        return super().__new__(cls, (impath, label, classname))

    impath = property(lambda self: self[0])
    label = property(lambda self: self[1])
    classname = property(lambda self: self[2])


@dataclasses.dataclass(frozen=True)
class CoopData:
    """One dataset's lists as CoOp builds them (tuples of `Record`, in CoOp's order).

    Attributes:
        name: the dataset (one of `NAMES`).
        image_dir: the folder that `relative` paths are relative to.
        train: the training list (the few-shot subset when `num_shots` >= 1).
        val: the validation list (few-shot: min(num_shots, 4) per class; ImageNet: the test list).
        test: the test list.
        class_names: label -> readable class name.
        fewshot_source: where the few-shot subset came from (a `.pkl` path or "drawn"); None
            without shots.
    """

    name: str
    image_dir: str
    train: tuple
    val: tuple
    test: tuple
    class_names: tuple
    fewshot_source: str | None = None

    def relative(self, record):
        """`record.impath` relative to the image folder, as split files write it."""
        return os.path.relpath(record.impath, self.image_dir)


def spec_name(name):
    """'coop/oxford_pets' -> 'oxford_pets'; a clear error for unknown names."""
    short = name.removeprefix(PREFIX)
    if short not in _SPECS:
        raise DataError(f"Unknown CoOp dataset {name!r}; known: "
                        f"{', '.join(PREFIX + n for n in NAMES)}.")
    return short


def templates(name, choice="coop"):
    """Prompt templates: CoOp's single template ("coop") or CLIP's ensemble ("clip")."""
    if choice not in TEMPLATE_CHOICES:
        raise DataError(f"templates={choice!r}: expected one of {list(TEMPLATE_CHOICES)}.")
    spec = _SPECS[spec_name(name)]
    return spec.coop_template if choice == "coop" else spec.clip_templates


def _missing(path, what, spec):
    return DataError(
        f"{path} does not exist: {what}. See the {spec.section!r} section of {_DATASETS_MD} "
        "for how to get it.")


def _read_text_lines(path, spec, what):
    if not os.path.isfile(path):
        raise _missing(path, what, spec)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _from_split_file(dataset_dir, image_dir, spec):
    path = os.path.join(dataset_dir, spec.split_file)
    if not os.path.isfile(path):
        raise _missing(path, "the fixed train/val/test split CoOp publishes", spec)
    try:
        with open(path, encoding="utf-8") as f:
            split = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable split file ({e}).") from e
    lists = []
    for key in ("train", "val", "test"):
        items = split.get(key) if isinstance(split, dict) else None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON object with a {key!r} list of "
                            "[relative_path, label, classname] entries.")
        records = []
        for i, item in enumerate(items):
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                    or isinstance(item[1], bool) or not isinstance(item[1], int)
                    or item[1] < 0 or not isinstance(item[2], str)):
                raise DataError(f"{path}: {key}[{i}] is {item!r}; expected [relative_path, "
                                "label >= 0, classname].")
            records.append(Record(os.path.join(image_dir, item[0]), item[1], item[2]))
        lists.append(tuple(records))
    _check_labels(lists, path)
    return tuple(lists)


def _check_labels(lists, path):
    """Labels 0..n-1 with every class in train (n <= its length), and one class name per
    label in all three lists: else a DataError naming the file and the first bad entry."""
    limit = len(lists[0])
    named = {}  # label -> (class name, where it was first seen)
    for key, records in zip(("train", "val", "test"), lists):
        for i, record in enumerate(records):
            if record.label >= limit:
                raise DataError(f"{path}: {key}[{i}] has label {record.label}; expected labels "
                                f"0..n-1, n <= the {limit} training entries.")
            name, where = named.setdefault(record.label, (record.classname, f"{key}[{i}]"))
            if name != record.classname:
                raise DataError(f"{path}: label {record.label} is named {name!r} in {where} "
                                f"and {record.classname!r} in {key}[{i}]; expected one class "
                                "name per label.")


def _fgvc_aircraft(dataset_dir, image_dir, spec):
    names = _read_text_lines(os.path.join(dataset_dir, "variants.txt"), spec,
                             "the list of the 100 aircraft variants (the class names)")
    label_of = {name: i for i, name in enumerate(names)}
    lists = []
    for split in ("train", "val", "test"):
        path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
        records = []
        for line in _read_text_lines(path, spec, f"the {split} split's image list"):
            image, _, classname = line.partition(" ")
            if classname not in label_of:
                raise DataError(f"{path}: variant {classname!r} of image {image!r} is not in "
                                f"{os.path.join(dataset_dir, 'variants.txt')}.")
            records.append(Record(os.path.join(image_dir, image + ".jpg"),
                                  label_of[classname], classname))
        lists.append(tuple(records))
    return tuple(lists)


def _imagenet_folder(image_dir, split, names, spec):
    """CoOp's `ImageNet.read_data`: sorted class folders, files in `os.listdir` order."""
    split_dir = os.path.join(image_dir, split)
    if not os.path.isdir(split_dir):
        raise _missing(split_dir, f"ImageNet's {split} images in class folders", spec)
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(f"{split_dir}: class folders {unknown[:5]} are not in classnames.txt.")
    records = []
    for label, folder in enumerate(folders):
        # Dassl's listdir_nohidden: os.listdir order, unsorted. CoOp's few-shot draw depends
        # on it, so it is kept (and is the same on the same file system).
        for file in os.listdir(os.path.join(split_dir, folder)):
            if not file.startswith("."):
                records.append(Record(os.path.join(split_dir, folder, file), label, names[folder]))
    return tuple(records)


def _imagenet_classnames(dataset_dir, spec):
    """CoOp's `ImageNet.read_classnames`: classnames.txt lines "<wnid> <name>", in file order."""
    names = {}
    for line in _read_text_lines(os.path.join(dataset_dir, "classnames.txt"), spec,
                                 "ImageNet's folder -> class name list"):
        folder, _, name = line.partition(" ")
        names[folder] = name
    return names


def _imagenet_variant(dataset_dir, image_dir, spec, name):
    """CoOp's imagenetv2.py / imagenet_sketch.py / imagenet_a.py / imagenet_r.py: one test list.

    V2: folders "0".."999" are the labels, named by classnames.txt's line order. Sketch, A and
    R: the sorted wnid folders (A and R: 200 of ImageNet's classes, README.txt skipped) get
    labels 0..n-1 and their names from classnames.txt.
    """
    names = _imagenet_classnames(dataset_dir, spec)
    if not os.path.isdir(image_dir):
        raise _missing(image_dir, f"the {name} images in class folders", spec)
    records = []
    if name == "imagenetv2":
        wnids = list(names)
        for label in range(len(wnids)):
            class_dir = os.path.join(image_dir, str(label))
            if not os.path.isdir(class_dir):
                raise _missing(class_dir, f"ImageNetV2's folder of class {label}", spec)
            records += [Record(os.path.join(class_dir, f), label, names[wnids[label]])
                        for f in os.listdir(class_dir) if not f.startswith(".")]
        return tuple(records)
    folders = sorted(f for f in os.listdir(image_dir)
                     if not f.startswith(".") and f != "README.txt")
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(f"{image_dir}: class folders {unknown[:5]} are not in "
                        f"{os.path.join(dataset_dir, 'classnames.txt')}.")
    for label, folder in enumerate(folders):
        class_dir = os.path.join(image_dir, folder)
        records += [Record(os.path.join(class_dir, f), label, names[folder])
                    for f in os.listdir(class_dir) if not f.startswith(".")]
    return tuple(records)


def _imagenet(dataset_dir, image_dir, spec):
    preprocessed = os.path.join(dataset_dir, "preprocessed.pkl")
    if os.path.isfile(preprocessed):
        logging.info("CoOp ImageNet: reading the lists of %s", preprocessed)
        lists = _read_pickle(preprocessed, ("train", "test"))
        return lists["train"], lists["test"], lists["test"]
    names = _imagenet_classnames(dataset_dir, spec)
    train = _imagenet_folder(image_dir, "train", names, spec)
    test = _imagenet_folder(image_dir, "val", names, spec)
    return train, test, test


# ----------------------------------------------------------------------- CoOp's pickles


class _Datum:
    """What an unpickled `dassl.data.datasets.base_dataset.Datum` becomes: its state, checked."""

    _FIELDS = {"_impath": str, "_label": int, "_domain": int, "_classname": str}

    def __setstate__(self, state):
        if (not isinstance(state, dict) or set(state) != set(self._FIELDS)
                or any(type(state[k]) is not t for k, t in self._FIELDS.items())):
            raise pickle.UnpicklingError(f"a Datum with unexpected state {state!r}")
        self.record = Record(state["_impath"], state["_label"], state["_classname"])


class _DatumUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and Dassl's `Datum` (as `_Datum`); nothing else."""

    def find_class(self, module, name):
        if (module, name) == ("dassl.data.datasets.base_dataset", "Datum"):
            return _Datum
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only Dassl's Datum is "
                                     "expected in a CoOp data pickle")


def _read_pickle(path, keys):
    """{key: tuple of Record} from a CoOp pickle holding {key: [Datum, ...]} for `keys`."""
    try:
        with open(path, "rb") as f:
            obj = _DatumUnpickler(io.BytesIO(f.read())).load()
    except Exception as e:  # any malformed pickle: one clear error naming the file
        raise DataError(f"{path}: not a CoOp data pickle ({type(e).__name__}: {e}).") from e
    if not isinstance(obj, dict) or not set(keys) <= set(obj):
        raise DataError(f"{path}: expected a dict with the lists {list(keys)}.")
    out = {}
    for key in keys:
        items = obj[key]
        if not isinstance(items, list) or not all(isinstance(d, _Datum) for d in items):
            raise DataError(f"{path}: {key!r} is not a list of Dassl Datum objects.")
        out[key] = tuple(d.record for d in items)
    return out


def _relocate(records, known, path, key):
    """`records` from a pickle written on another machine, matched to this folder's split
    lists (`known`: relative path -> Record) by the longest common path suffix."""
    out = []
    for record in records:
        parts = record.impath.replace("\\", "/").split("/")
        match = next((known[s] for s in ("/".join(parts[i:]) for i in range(len(parts)))
                      if s in known), None)
        if match is None or (match.label, match.classname) != (record.label, record.classname):
            raise DataError(
                f"{path}: {key} image {record.impath!r} (label {record.label}, "
                f"{record.classname!r}) is not in this dataset's split files; the pickle was "
                "made from other splits. Move it away to draw the subset afresh.")
        out.append(match)
    return tuple(out)


# ------------------------------------------------------------------------ the few-shot draw


def _fewshot(rng, records, num_shots):
    """Dassl's `generate_fewshot_dataset` (repeat=False) with `rng` as its `random`."""
    by_label = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    out = []
    for items in by_label.values():
        out.extend(rng.sample(items, num_shots) if len(items) >= num_shots else items)
    return tuple(out)


def _files_read(root, name, num_shots, seed):
    """The files (and image folders, whose listing ImageNet's lists come from) that `load`
    reads besides the images, for its cache key."""
    spec = _SPECS[name]
    if spec.split_file:
        files = [spec.split_file]
    elif name == "fgvc_aircraft":
        files = ["variants.txt", *(f"images_variant_{s}.txt" for s in ("train", "val", "test"))]
    elif name == "imagenet":
        files = ["preprocessed.pkl", "classnames.txt", os.path.join(spec.images, "train"),
                 os.path.join(spec.images, "val")]
    else:
        files = ["classnames.txt", spec.images]
    files.append(os.path.join("split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl"))
    dataset_dir = os.path.join(root, spec.directory)
    return (dataset_dir, *(os.path.join(dataset_dir, f) for f in files))


def _stamp(paths):
    """(path, mtime, size) of each path, None for those missing: a cache key that changes
    when a file is rewritten, appears or goes."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append((path, None, None))
        else:
            stamps.append((path, stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


@functools.lru_cache(maxsize=8)
def _full_lists(root, name, stamp):
    del stamp  # the cache key only: files changed on disk are read again
    spec = _SPECS[name]
    dataset_dir = os.path.join(root, spec.directory)
    if not os.path.isdir(dataset_dir):
        raise _missing(dataset_dir, f"the {name} folder under data.root={root!r}", spec)
    image_dir = os.path.join(dataset_dir, spec.images)
    if name == "imagenet":
        lists = _imagenet(dataset_dir, image_dir, spec)
    elif name in TEST_ONLY:
        test = _imagenet_variant(dataset_dir, image_dir, spec, name)
        lists = test, (), test
    elif name == "fgvc_aircraft":
        lists = _fgvc_aircraft(dataset_dir, image_dir, spec)
    else:
        lists = _from_split_file(dataset_dir, image_dir, spec)
    return dataset_dir, image_dir, lists


def _class_names(train, name):
    """Dassl's `get_lab2cname` of the training list, CoOp's "_" -> " ", labels 0..n-1."""
    names = dict((record.label, record.classname) for record in train)
    n = max(names) + 1 if names else 0
    if n < 2 or len(names) != n:  # n distinct labels below n: exactly 0..n-1
        raise DataError(f"CoOp dataset {name!r}: the training list has labels "
                        f"{sorted(names)[:10]}...; expected 0..n-1 with n >= 2.")
    return tuple(classnames.readable(names[label]) for label in range(n))


def subsample_classes(lists, subsample):
    """CoOp's `subsample_classes`: the sorted labels of the first list (train) split in half,
    ceil(n / 2) "base" then the "new" rest; each list keeps its records of the chosen half,
    relabelled 0..m-1 in label order. "all" returns the lists as they are."""
    if subsample not in SUBSAMPLES:
        raise DataError(f"subsample={subsample!r}: expected one of {list(SUBSAMPLES)}.")
    if subsample == "all":
        return lists
    labels = sorted({r.label for r in lists[0]})
    half = -(-len(labels) // 2)
    selected = labels[:half] if subsample == "base" else labels[half:]
    relabel = {label: i for i, label in enumerate(selected)}
    return tuple(tuple(Record(r.impath, relabel[r.label], r.classname) for r in records
                       if r.label in relabel) for records in lists)


def _check_images(lists, name):
    """Every listed image exists, and those the input pipeline reads (train and test) would
    decode (`folder.check_images`, from each file's first and last bytes): a file tf.data
    cannot decode stops it with an error that names no file."""
    for split, records in zip(("train", "val", "test"), lists):
        missing = [r.impath for r in records if not os.path.isfile(r.impath)]
        if missing:
            raise DataError(
                f"CoOp dataset {name!r}: {len(missing)} of the {len(records)} {split} images "
                f"listed are missing on disk; the first is {missing[0]}.")
    for split, records in (("train", lists[0]), ("test", lists[2])):
        try:
            folder_lib.check_images(tuple(r.impath for r in records))
        except ValueError as e:
            raise DataError(f"CoOp dataset {name!r}, {split} list: {e}") from e


def load(root, name, *, num_shots=0, seed=1, subsample="all"):
    """The train, val and test lists that CoOp builds for `name` under `root` (its `$DATA`).

    Args:
        root: the folder holding the datasets in CoOp's layout (`DATASETS.md`).
        name: one of `NAMES` (a "coop/" prefix is accepted).
        num_shots: images per class in train (val: min(num_shots, 4)); 0: the full lists.
            Ignored for the test-only ImageNet variants (`TEST_ONLY`), as in CoOp.
        seed: the few-shot draw's seed (CoOp's `--seed`: 1, 2, 3 in its scripts).
        subsample: "all" classes, or CoCoOp's "base" / "new" half (`subsample_classes`,
            applied after the few-shot draw).

    Returns:
        CoopData. Raises DataError naming the file when something is missing or malformed
        (labels not 0..n-1, two class names for one label), when listed images are missing
        on disk (the first one and the count), and naming the train or test images that
        would not decode. Cached per process by the arguments and the (path, mtime, size) of
        the split and few-shot files: a file rewritten on disk is read again.
    """
    name = spec_name(name)
    if isinstance(num_shots, bool) or not isinstance(num_shots, int) or num_shots < 0:
        raise DataError(f"num_shots={num_shots!r}: expected an int >= 0.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed={seed!r}: expected an int (CoOp's --seed; random.Random "
                        "draws another subset for the str or float of the same number).")
    root = os.path.abspath(os.path.expanduser(root))
    stamp = _stamp(_files_read(root, name, num_shots, seed))
    return _load(root, name, num_shots, seed, subsample, stamp)


@functools.lru_cache(maxsize=16)
def _load(root, name, num_shots, seed, subsample, stamp):
    dataset_dir, image_dir, (train, val, test) = _full_lists(root, name, stamp[:-1])
    source = None
    if num_shots >= 1 and name not in TEST_ONLY:
        source = os.path.join(dataset_dir, "split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl")
        keys = ("train",) if name == "imagenet" else ("train", "val")
        if os.path.isfile(source):
            logging.info("CoOp %s: the %d-shot subset of seed %d is CoOp's cached %s",
                         name, num_shots, seed, source)
            cached = _read_pickle(source, keys)
            known = {os.path.relpath(r.impath, image_dir): r for r in (*train, *val)}
            train = _relocate(cached["train"], known, source, "train")
            if name != "imagenet":
                val = _relocate(cached["val"], known, source, "val")
        else:
            rng = random.Random(seed)  # CoOp: random.seed(cfg.SEED) before building the data
            train = _fewshot(rng, train, num_shots)
            if name != "imagenet":
                val = _fewshot(rng, val, min(num_shots, 4))
            source = "drawn"
            logging.info("CoOp %s: %d-shot subset of seed %d drawn as Dassl does (%d train, "
                         "%d val images)", name, num_shots, seed, len(train), len(val))
    train, val, test = lists = subsample_classes((train, val, test), subsample)
    _check_images(lists, name)
    names = _class_names(train, name)
    for split, records in zip(("val", "test"), (val, test)):
        bad = [r for r in records if r.label >= len(names)]
        if bad:
            raise DataError(f"CoOp dataset {name!r}: {split} image {bad[0].impath} has label "
                            f"{bad[0].label}; the training list has {len(names)} classes.")
    return CoopData(name=name, image_dir=image_dir, train=train, val=val, test=test,
                    class_names=names, fewshot_source=source)
