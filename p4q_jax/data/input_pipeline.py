"""tf.data input pipelines: CLIP-preprocessed batches, sharded by process, k-shot, padded for eval.

Every source (TFDS, an image folder, synthetic data) yields `{"image": <raw>, "label": int}` in a
fixed order, with the image still encoded (or a file path), so that few-shot selection, process
sharding and shuffling never decode an image they drop. Decoding and `clip.preprocess_tf` run once
per kept example, in parallel.
"""
import dataclasses
import functools
import os
import warnings

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from p4q_jax.clip import transforms
from p4q_jax.data import coop
from p4q_jax.data import folder as folder_lib
from p4q_jax.data import registry
from p4q_jax.data import shapes_tfds  # noqa: F401  (registers the shapes builders with TFDS)
from p4q_jax.data import synthetic

_AUTOTUNE = tf.data.AUTOTUNE


def _with_index(ds, start=0):
    """Each example with its position in the split, from `start` (`index`, int64)."""
    return ds.enumerate(start).map(lambda i, ex: {**ex, "index": i})


def _not_prepared_message(builder, data_dir):
    message = (
        f"TFDS dataset {builder.name!r} is not prepared under data_dir={data_dir!r} (looked in "
        f"{builder.data_dir}), and nothing is downloaded at run time.")
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        return message + (
            f" It is built from files you download yourself ({instructions}): put them in a "
            "folder and set config.data.manual_dir to it; it is then prepared here, offline, once.")
    return message + (
        f" Prepare it once where there is network access (`tfds build {builder.name} "
        f"--data_dir=DIR`, or `tfds.builder({builder.name!r}, data_dir=DIR)"
        ".download_and_prepare()`) and set config.data.data_dir=DIR.")


@dataclasses.dataclass(frozen=True)
class _TfdsSource:
    """A TFDS dataset; the image stays encoded until `decode`."""

    info: registry.DatasetInfo
    data_dir: str | None
    manual_dir: str | None

    def _builder(self):
        builder = tfds.builder(self.info.tfds_name, data_dir=self.data_dir)
        if self.info.generated and not builder.is_prepared():
            # Rendered locally, once (seconds); never looks for a prepared copy online.
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
        if self.manual_dir and builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not builder.is_prepared():
            # Preparing from manually downloaded archives reads only local files.
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=self.manual_dir, try_download_gcs=False))
        return builder

    def read(self, split, *, shuffle_files=False, seed=None):
        builder = self._builder()
        keys = (self.info.image_key, self.info.label_key)
        decoders = tfds.decode.PartialDecoding(
            {key: True for key in keys}, decoders={self.info.image_key: tfds.decode.SkipDecoding()})
        try:
            ds = builder.as_dataset(
                split=split, shuffle_files=shuffle_files, decoders=decoders,
                read_config=tfds.ReadConfig(shuffle_seed=seed))
        except AssertionError as error:  # TFDS's way of saying the data is not there.
            if "could not find data" not in str(error):
                raise
            raise FileNotFoundError(_not_prepared_message(builder, self.data_dir)) from error
        return ds.map(lambda ex: {"image": ex[keys[0]], "label": ex[keys[1]]})

    def read_process_part(self, split, *, index, count, shuffle_files=False, seed=None):
        """Process `index`'s contiguous part (TFDS's even split), each example with its
        position in the split (`index`; in file order, so only without `shuffle_files`)."""
        parts = [split] if count == 1 else tfds.even_splits(split, n=count)
        start = sum(int(self.read(part).cardinality()) for part in parts[:index])
        return _with_index(self.read(parts[index], shuffle_files=shuffle_files, seed=seed),
                           start=start)

    def num_examples(self, split):
        cardinality = int(self.read(split).cardinality())
        if cardinality < 0:
            raise ValueError(f"TFDS did not report the size of {self.info.tfds_name} {split!r}.")
        return cardinality

    def decode(self, image):
        return self._builder().info.features[self.info.image_key].decode_example(image)


class _FileSource:
    """Image files listed in memory: the image is its path until `decode`, which reads and
    decodes it in the pipeline's parallel map. Subclasses give `files(split)`."""

    def files(self, split):
        """(paths, labels) of `split`."""
        raise NotImplementedError

    def read(self, split, *, shuffle_files=False, seed=None):
        del shuffle_files, seed  # One in-memory list of paths: the shuffle buffer does it all.
        paths, labels = self.files(split)
        return tf.data.Dataset.from_tensor_slices(
            {"image": list(paths), "label": np.asarray(labels, np.int64)})

    def read_process_part(self, split, *, index, count, shuffle_files=False, seed=None):
        return _with_index(self.read(split, shuffle_files=shuffle_files, seed=seed)).shard(
            count, index)

    def num_examples(self, split):
        return len(self.files(split)[0])

    def decode(self, image):
        pixels = tf.io.decode_image(tf.io.read_file(image), channels=3, expand_animations=False)
        return tf.ensure_shape(pixels, (None, None, 3))


@dataclasses.dataclass(frozen=True)
class _FolderSource(_FileSource):
    """Images under `root/<split>/<class>/`."""

    root: str
    classes: tuple

    def files(self, split):
        return folder_lib.files(self.root, split, self.classes)


@dataclasses.dataclass(frozen=True)
class _CoopSource(_FileSource):
    """A CoOp dataset's lists (`coop.load`, few-shot subset and class half included)."""

    data: coop.CoopData

    def files(self, split):
        records = {"train": self.data.train, "test": self.data.test}[split]
        return [r.impath for r in records], [r.label for r in records]


@dataclasses.dataclass(frozen=True)
class _SyntheticSource:
    """Generated images (see `synthetic`), already decoded."""

    num_classes: int
    examples_per_split: int

    def read(self, split, *, shuffle_files=False, seed=None):
        del shuffle_files, seed  # Already in memory.
        images, labels = synthetic.examples(
            num_classes=self.num_classes, num_examples=self.examples_per_split, split=split)
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": labels.astype(np.int64)})

    def read_process_part(self, split, *, index, count, shuffle_files=False, seed=None):
        return _with_index(self.read(split, shuffle_files=shuffle_files, seed=seed)).shard(
            count, index)

    def num_examples(self, split):
        del split  # Both splits have the same size.
        return self.examples_per_split

    def decode(self, image):
        return image


def _source(cfg, info):
    if info.name == "synthetic":
        return _SyntheticSource(cfg.synthetic_classes, cfg.synthetic_examples)
    if info.name == "folder":
        splits = (info.train_split, info.test_split)
        classes = folder_lib.class_dirs(info.root, splits)
        folder_lib.check(info.root, splits, classes)
        return _FolderSource(info.root, classes)
    if info.name.startswith(coop.PREFIX):
        return _CoopSource(coop.load(info.root, info.name, num_shots=cfg.num_shots,
                                     seed=cfg.shot_seed, subsample=cfg.subsample))
    return _TfdsSource(info, cfg.data_dir, cfg.manual_dir)


@functools.lru_cache(maxsize=8)
def _labels(source, split, num_examples):
    """All labels of a split, in source order.

    Cached because a label scan of ImageNet takes minutes and `num_examples` and `create_dataset`
    both need it. `num_examples` is only part of the cache key: data of another size is other data.
    """
    del num_examples
    batches = source.read(split).map(lambda ex: ex["label"]).batch(8192).as_numpy_iterator()
    return np.concatenate([np.zeros([0], np.int64), *batches])


def _few_shot_indices(labels, *, num_shots, num_classes, seed):
    """Sorted indices of `num_shots` random examples per class (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    chosen, short = [], []
    for label in range(num_classes):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < num_shots:
            short.append(label)
        chosen.append(rng.choice(candidates, size=min(num_shots, len(candidates)), replace=False))
    if short:
        warnings.warn(
            f"{len(short)} classes have fewer than {num_shots} training examples and keep all they "
            f"have (labels {short[:10]}{'...' if len(short) > 10 else ''}).", stacklevel=3)
    return np.sort(np.concatenate(chosen))


def _few_shot_subset(cfg, info, source, split):
    """Indices of the k-shot subset of `split` (our "train"), or None for the full split
    (and for CoOp datasets, whose lists already are CoOp's few-shot subset)."""
    if split != "train" or not cfg.num_shots or isinstance(source, _CoopSource):
        return None
    own = info.split_name(split)
    labels = _labels(source, own, source.num_examples(own))
    return _few_shot_indices(
        labels, num_shots=cfg.num_shots, num_classes=info.num_classes, seed=cfg.shot_seed)


def _process_part(cfg, info, source, *, split, train, seed):
    """(raw examples, number of examples over all processes). Training reads the whole split
    on every process (the stream of global batches is then the same for any number of
    processes; each keeps its slice of every batch before decoding); a pass reads this
    process's part, each example with its position in the split (`index`)."""
    own = info.split_name(split)
    index, count = (0, 1) if train else (jax.process_index(), jax.process_count())
    subset = _few_shot_subset(cfg, info, source, split)
    if subset is None:
        part = source.read_process_part(
            own, index=index, count=count, shuffle_files=train, seed=seed)
        return part, source.num_examples(own)
    keep = np.zeros(source.num_examples(own), bool)
    keep[subset] = True
    keep = tf.constant(keep)
    # The subset is small by construction: cache it (still encoded) instead of re-reading the split.
    subset_stream = (source.read(own).enumerate()
                     .filter(lambda i, ex: tf.gather(keep, i))
                     .map(lambda i, ex: ex))
    part = _with_index(subset_stream).shard(count, index).cache()
    return part, len(subset)


def _local_batch_size(batch_size):
    count = jax.process_count()
    if batch_size < 1 or batch_size % count:
        raise ValueError(
            f"batch_size ({batch_size}) is the global batch and must be a positive multiple of "
            f"the number of processes ({count}).")
    return batch_size // count


def create_dataset(cfg, *, split, batch_size, image_size, train, seed=0, skip_batches=0,
                   augment_view=None):
    """This process's batches of CLIP-preprocessed images.

    Args:
        cfg: the `config.data` ConfigDict (name, data_dir, manual_dir, num_shots, shot_seed, flip,
            augment, shuffle_buffer, folder, root, synthetic_classes, synthetic_examples).
        split: "train" or "test" (mapped to the dataset's own splits). `cfg.num_shots` > 0 makes
            "train" the k-shot subset chosen by `cfg.shot_seed`, the same on every process.
        batch_size: the global batch; each process gets batch_size / process_count examples:
            in training its slice of each global batch (the global batches are the same for
            any number of processes), in a pass its own disjoint part of the split.
        image_size: side of the square CLIP input.
        train: True: seeded shuffle, repeated forever, full batches only, and the training
            views of `cfg.augment`: "flip" (resize + center crop, as at test time) or "coop"
            (CoOp's random resized crop, `transforms.random_resized_crop_tf`), each followed by
            a random horizontal flip if `cfg.flip`. False: resize + center crop, one pass in
            order, the last batch padded to full size with `mask` False, and every process
            given the same number of batches (so an evaluation compiles once, never counts
            padding, and no process waits for another).
        seed: shuffle and augmentation seed.
        skip_batches: training batches to leave out at the start (a resumed run): skipped
            before decoding, and the views are seeded by stream position, so the batches that
            follow are those of a run that never stopped.
        augment_view: with train=False, the pass of the split (in order, padded) whose images
            are the training views of `cfg.augment` seeded by (seed, augment_view, position):
            one pass per random view, for a feature cache of several views.

    Returns:
        tf.data.Dataset of {"image": float32 [b, S, S, 3], "label": int32 [b], "mask": bool [b]},
        and in a pass "index": int32 [b], each example's position in the split (-1: padding).
    """
    local_batch = _local_batch_size(batch_size)
    augment = cfg.augment
    if augment not in registry.AUGMENTATIONS:
        raise ValueError(
            f"data.augment={augment!r}: expected one of {list(registry.AUGMENTATIONS)}.")
    info = registry.info_from_config(cfg)
    source = _source(cfg, info)
    ds, total = _process_part(cfg, info, source, split=split, train=train, seed=seed)

    def label_and_mask(ex, image):
        out = {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(True)}
        if not train:
            out["index"] = tf.cast(ex["index"], tf.int32)
        return out

    # Stateless randomness seeded by (seed, position in the stream[, view]): reproducible
    # under parallelism and across a resume.
    def training_view(position, ex, fold=None):
        view_seed = tf.stack([tf.constant(seed, tf.int64), position])
        if fold is not None:
            view_seed = tf.random.experimental.stateless_fold_in(view_seed, fold)
        pixels = source.decode(ex["image"])
        if augment == "coop":
            crop_seed = tf.random.experimental.stateless_fold_in(view_seed, 1)
            image = transforms.random_resized_crop_tf(pixels, size=image_size, seed=crop_seed)
        else:
            image = transforms.preprocess_tf(pixels, size=image_size)
        if cfg.flip:
            image = tf.image.stateless_random_flip_left_right(image, view_seed)
        return label_and_mask(ex, image)

    if train:
        # The same shuffled stream on every process; positions count global examples.
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.enumerate().skip(skip_batches * batch_size)
        index, count = jax.process_index(), jax.process_count()
        if count > 1:  # this process's slice of every global batch, before decoding
            ds = ds.filter(lambda position, ex: (position // local_batch) % count == index)
        ds = ds.map(training_view, num_parallel_calls=_AUTOTUNE)
    else:
        if augment_view is not None:
            ds = ds.map(lambda ex: training_view(ex["index"], ex, fold=augment_view + 1),
                        num_parallel_calls=_AUTOTUNE)
        else:
            ds = ds.map(lambda ex: label_and_mask(
                ex, transforms.preprocess_tf(source.decode(ex["image"]), size=image_size)),
                num_parallel_calls=_AUTOTUNE)
        steps = _eval_steps(total, local_batch)
        padding = tf.data.Dataset.from_tensors({
            "image": tf.zeros((image_size, image_size, 3), tf.float32),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
            "index": tf.constant(-1, tf.int32),
        }).repeat()
        ds = ds.concatenate(padding).take(steps * local_batch)
    return ds.batch(local_batch, drop_remainder=True).prefetch(_AUTOTUNE)


def _eval_steps(total, local_batch):
    per_process = -(-total // jax.process_count())
    return -(-per_process // local_batch)


def num_eval_batches(cfg, *, split, batch_size):
    """Batches that `create_dataset(..., train=False)` yields on every process."""
    return _eval_steps(num_examples(cfg, split=split), _local_batch_size(batch_size))


def num_examples(cfg, *, split):
    """Examples in `split` over all processes (the k-shot subset's size for "train" with shots)."""
    info = registry.info_from_config(cfg)
    source = _source(cfg, info)
    subset = _few_shot_subset(cfg, info, source, split)
    return source.num_examples(info.split_name(split)) if subset is None else len(subset)


def training_examples(cfg):
    """The exact training examples that `create_dataset(cfg, split="train")` reads, as JSON:
    image paths relative to `image_dir` with labels (and class names, for CoOp datasets, in
    CoOp's split-file form), or for TFDS datasets the positions in the split's read order."""
    info = registry.info_from_config(cfg)
    source = _source(cfg, info)
    out = {"dataset": cfg.name, "num_shots": cfg.num_shots, "shot_seed": cfg.shot_seed}
    if isinstance(source, _CoopSource):
        d = source.data
        return {**out, "image_dir": d.image_dir, "fewshot_source": d.fewshot_source,
                **{split: [[d.relative(r), r.label, r.classname] for r in getattr(d, split)]
                   for split in ("train", "val")}}
    own = info.split_name("train")
    subset = _few_shot_subset(cfg, info, source, "train")
    if isinstance(source, _FolderSource):
        paths, labels = source.files(own)
        image_dir = os.path.join(info.root, own)
        chosen = range(len(paths)) if subset is None else subset
        return {**out, "image_dir": image_dir,
                "train": [[os.path.relpath(paths[i], image_dir), int(labels[i])] for i in chosen]}
    return {**out, "split": own, "indices": "all" if subset is None else subset.tolist()}


def in_the_foreground(ds):
    """`ds` without tf.data's autotuning, which keeps decoding ahead in the background: where
    a consumer reads a batch, then runs a long XLA computation on it (a calibration pass),
    that decoding competes with XLA's threads on a machine with few cores, and slows the
    computation more than decoding in the foreground costs (docs/results.md, "The p4q job's
    memory, phase by phase")."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def as_numpy_batches(ds):
    """Iterates a dataset as dicts of numpy arrays, each a copy in memory of its own.

    `tfds.as_numpy` hands out views of TensorFlow's buffers, which a CPU `jax.Array` made
    from them keeps alive, and TensorFlow's allocator never returns freed memory to the
    system: the 10 calibration batches of 128 images the p4q job holds would stay in its
    resident memory to the end. A copy pins TensorFlow's memory to the
    pipeline's own few batches in flight."""
    for batch in tfds.as_numpy(ds):
        yield jax.tree.map(np.array, batch)
