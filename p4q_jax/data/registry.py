"""Which datasets exist, where their data comes from, and their class names and prompt templates."""
import dataclasses
from typing import Callable

from p4q_jax.data import classnames
from p4q_jax.data import coop
from p4q_jax.data import folder as folder_lib
from p4q_jax.data import shapes
from p4q_jax.data import synthetic

SPLITS = ("train", "test")
AUGMENTATIONS = ("flip", "coop")  # config.data.augment: see `create_dataset`


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """What the input pipeline and the prompts need to know about one dataset.

    Attributes:
        name: our name for it (the `config.data.name`).
        tfds_name: TFDS builder name (with config, e.g. "eurosat/rgb"); None for "folder" and
            "synthetic".
        train_split: the dataset's own split (TFDS split syntax, or a folder's sub-folder, "" for
            the folder itself) that serves as "train"; None where there is none (test-only sets).
        test_split: the same for "test".
        class_names: one readable name per label index, as it goes into a prompt.
        templates: prompt templates, "{}" standing for the class name.
        image_key: the image feature's key in a TFDS example.
        label_key: the label feature's key in a TFDS example.
        root: the image folder, for "folder"; CoOp's `$DATA`, for "coop/<name>".
        generated: the project's own TFDS builder renders the data, so a missing dataset is
            prepared on first read (offline) instead of being an error.
    """

    name: str
    tfds_name: str | None
    train_split: str | None
    test_split: str
    class_names: tuple
    templates: tuple
    image_key: str = "image"
    label_key: str = "label"
    root: str | None = None
    generated: bool = False

    @property
    def num_classes(self):
        return len(self.class_names)

    def split_name(self, split):
        """The dataset's own split for our "train" or "test"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        own = self.train_split if split == "train" else self.test_split
        if own is None:
            raise ValueError(
                f"Dataset {self.name!r} has no {split} split (it is for evaluation only).")
        return own


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TfdsSpec:
    """A TFDS dataset: fixed `class_names`, or `clean` applied to the builder's label names."""

    tfds_name: str
    train_split: str | None
    test_split: str
    templates: tuple
    class_names: tuple | None = None
    clean: Callable | None = None
    generated: bool = False


_TFDS_DATASETS = {
    # Rendered here (`shapes_tfds.ShapesBuilder`): the tiny CLIP's pretraining distribution.
    "shapes": _TfdsSpec(
        tfds_name=shapes.TFDS_NAMES["neutral"], train_split="train", test_split="test",
        templates=shapes.TEMPLATES, class_names=shapes.CLASS_NAMES, generated=True),
    # The same scenes under warm light (`shapes_tfds.WarmShapesBuilder`): the demo's task.
    "shapes_warm": _TfdsSpec(
        tfds_name=shapes.TFDS_NAMES["warm"], train_split="train", test_split="test",
        templates=shapes.TEMPLATES, class_names=shapes.CLASS_NAMES, generated=True),
    "cifar10": _TfdsSpec(
        tfds_name="cifar10", train_split="train", test_split="test",
        templates=classnames.CIFAR_TEMPLATES, class_names=classnames.CIFAR10_CLASSNAMES),
    "cifar100": _TfdsSpec(
        tfds_name="cifar100", train_split="train", test_split="test",
        templates=classnames.CIFAR_TEMPLATES, class_names=classnames.CIFAR100_CLASSNAMES),
    "imagenet2012": _TfdsSpec(
        tfds_name="imagenet2012", train_split="train", test_split="validation",
        templates=classnames.IMAGENET_TEMPLATES, class_names=classnames.IMAGENET_CLASSNAMES),
    "imagenet_v2": _TfdsSpec(
        tfds_name="imagenet_v2", train_split=None, test_split="test",
        templates=classnames.IMAGENET_TEMPLATES, class_names=classnames.IMAGENET_CLASSNAMES),
    "imagenet_sketch": _TfdsSpec(
        tfds_name="imagenet_sketch", train_split=None, test_split="test",
        templates=classnames.IMAGENET_TEMPLATES, class_names=classnames.IMAGENET_CLASSNAMES),
    "oxford_iiit_pet": _TfdsSpec(
        tfds_name="oxford_iiit_pet", train_split="train", test_split="test",
        templates=classnames.PET_TEMPLATES, clean=classnames.pet_names),
    # TFDS's train split has 10 images per class; with validation, 20 (enough for 16 shots).
    "oxford_flowers102": _TfdsSpec(
        tfds_name="oxford_flowers102", train_split="train+validation", test_split="test",
        templates=classnames.FLOWER_TEMPLATES, clean=classnames.plain_names),
    "food101": _TfdsSpec(
        tfds_name="food101", train_split="train", test_split="validation",
        templates=classnames.FOOD_TEMPLATES, clean=classnames.plain_names),
    "caltech101": _TfdsSpec(
        tfds_name="caltech101", train_split="train", test_split="test",
        templates=classnames.PHOTO_TEMPLATES, clean=classnames.caltech101_names),
    "dtd": _TfdsSpec(
        tfds_name="dtd", train_split="train+validation", test_split="test",
        templates=classnames.TEXTURE_TEMPLATES, clean=classnames.plain_names),
    # TFDS has only a train split for EuroSAT; its first 80% trains, the rest tests.
    "eurosat": _TfdsSpec(
        tfds_name="eurosat/rgb", train_split="train[:80%]", test_split="train[80%:]",
        templates=classnames.SATELLITE_TEMPLATES, clean=classnames.eurosat_names),
    "sun397": _TfdsSpec(
        tfds_name="sun397/tfds", train_split="train", test_split="test",
        templates=classnames.PHOTO_TEMPLATES, clean=classnames.sun397_names),
    "cars196": _TfdsSpec(
        tfds_name="cars196", train_split="train", test_split="test",
        templates=classnames.PHOTO_TEMPLATES, clean=classnames.car_names),
}

NAMES = (*sorted(_TFDS_DATASETS), "folder", "synthetic", *(coop.PREFIX + n for n in coop.NAMES))


def _tfds_info(name, spec, data_dir):
    """A TFDS dataset's info. Fixed class names need no TensorFlow (benchmarks and class-name
    lookups run without it; `test_registry` checks them against the builders' labels); cleaned
    ones are read from the builder."""
    names = spec.class_names
    if names is None:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (5 s)
        label = tfds.builder(spec.tfds_name, data_dir=data_dir).info.features["label"]
        if label.names == [str(i) for i in range(label.num_classes)]:
            raise ValueError(
                f"{name}: the TFDS builder {spec.tfds_name!r} knows its class names only once "
                f"the dataset is prepared, and it is not prepared in data_dir={data_dir!r}.")
        names = spec.clean(label.names)
    return DatasetInfo(
        name=name, tfds_name=spec.tfds_name, train_split=spec.train_split,
        test_split=spec.test_split, class_names=tuple(names), templates=spec.templates,
        generated=spec.generated)


def get_info(name, *, data_dir=None, folder=None, synthetic_classes=10, root=None,
             num_shots=0, shot_seed=1, templates="coop", subsample="all"):
    """The DatasetInfo for a dataset name (see `NAMES`). Reads no images, downloads nothing.

    Args:
        name: a TFDS dataset in the registry, "folder", "synthetic" or "coop/<name>".
        data_dir: TFDS data directory (None: TFDS's default).
        folder: the image folder's root, for "folder".
        synthetic_classes: number of classes, for "synthetic".
        root: CoOp's `$DATA`, for "coop/<name>" (whose split files are read, see `coop.load`).
        num_shots, shot_seed: the few-shot subset, for "coop/<name>".
        templates: "coop" (CoOp's single template) or "clip" (CLIP's ensemble), for "coop/<name>".
        subsample: "all", "base" or "new" classes (CoCoOp's halves), for "coop/<name>".
    """
    if name.startswith(coop.PREFIX):
        if not root:
            raise ValueError(f"Dataset {name!r} needs CoOp's data folder (config.data.root).")
        loaded = coop.load(root, name, num_shots=num_shots, seed=shot_seed, subsample=subsample)
        test_only = coop.spec_name(name) in coop.TEST_ONLY
        return DatasetInfo(
            name=name, tfds_name=None, train_split=None if test_only else "train",
            test_split="test",
            class_names=loaded.class_names, templates=coop.templates(name, templates), root=root)
    if name == "synthetic":
        return DatasetInfo(
            name=name, tfds_name=None, train_split="train", test_split="test",
            class_names=synthetic.class_names(synthetic_classes),
            templates=classnames.GENERIC_TEMPLATES)
    if name == "folder":
        if not folder:
            raise ValueError("Dataset 'folder' needs the image folder's root (config.data.folder).")
        train_dir, test_dir = folder_lib.split_dirs(folder)
        dirs = folder_lib.class_dirs(folder, (train_dir, test_dir))
        return DatasetInfo(
            name=name, tfds_name=None, train_split=train_dir, test_split=test_dir,
            class_names=tuple(classnames.readable(d) for d in dirs),
            templates=classnames.GENERIC_TEMPLATES, root=folder)
    if name not in _TFDS_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(NAMES)}.")
    return _tfds_info(name, _TFDS_DATASETS[name], data_dir)


def info_from_config(cfg):
    """`get_info` for the `config.data` section (with `data.validation`, its validation
    carve: `with_validation`)."""
    info = get_info(
        cfg.name, data_dir=cfg.data_dir, folder=cfg.folder,
        synthetic_classes=cfg.synthetic_classes, root=cfg.root,
        num_shots=cfg.num_shots, shot_seed=cfg.shot_seed, templates=cfg.templates,
        subsample=cfg.subsample)
    return with_validation(info, cfg.validation) if cfg.validation else info


def with_validation(info, percent):
    """`info` whose "train" is its training split less its first `percent`% and whose
    "test" is that held-out part (TFDS split slicing), for choosing hyper-parameters
    without the test split."""
    own = info.train_split
    if info.tfds_name is None or not own or any(c in own for c in "[+"):
        raise ValueError(f"data.validation={percent}: {info.name!r} has no single TFDS training "
                         f"split to carve a validation part from (its training split: {own!r})")
    return dataclasses.replace(info, train_split=f"{own}[{percent}%:]",
                               test_split=f"{own}[:{percent}%]")


def prompts(class_names, templates):
    """Every template filled with every class name: [n_classes][n_templates] strings."""
    return [[template.format(name) for template in templates] for name in class_names]
