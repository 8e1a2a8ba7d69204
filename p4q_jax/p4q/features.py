"""Cache of the frozen image features, and the training input built on it: whether a run
uses it (`uses_cache`), its key, and its build or read-back (`cached_input`).

Both image towers are frozen and the only augmentation is a horizontal flip, so the
quantized student's and the FP teacher's feature of every training image, in both
views, are computed once (`build_cache`, with the sharded encoder) and each step
samples from them (`CachedInput`): exactly the training the per-step encoder would do,
without the two image towers in the step (docs/design.md, "Speed rules (where the time
goes)").

Each process computes and saves the features of its own part of the training set (`.npy`
files under a directory, memory-mapped when read back), each example with its position in
the split; `gather` then gives every process the whole cache in split order. The global
batches and the views are a function of (seed, step) alone: a run resumed at step n reads
exactly the batches an uninterrupted run reads, and any number of processes reads the same
global batches, each process its slice.
"""

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from p4q_jax import atomic
from p4q_jax import data
from p4q_jax import parallel
from p4q_jax.p4q import step as step_lib
from p4q_jax.quant import integer

FIELDS = ("student", "teacher", "label")
PART_FIELDS = (*FIELDS, "index")  # a process's part: each example's position in the split
_MARKER = "fingerprint.json"


def make_encoder(model, mesh, *, flip=True):
    """Jitted (params, qstate, images [B, H, W, 3]) -> {"student", "teacher"}: [B, V, E] each,
    with `flip` V = 2, view 0 the image as given and view 1 its horizontal flip, else V = 1;
    batch sharded over `data`, params and qstate taken as placed (`parallel.place_weights`).
    Scheduled for memory on CPUs (`step.compiler_options`): XLA's concurrent schedule runs
    the two towers side by side, holding both towers' activations at once."""

    def encode(params, qstate, images):
        views = jnp.concatenate([images, images[:, :, ::-1]]) if flip else images
        out = step_lib.paired_image_features(model, params, qstate, views)
        return jax.tree.map(lambda f: jnp.stack(jnp.split(f, 2 if flip else 1), axis=1), out)

    return jax.jit(encode, in_shardings=(None, None, parallel.batch_sharding(mesh)),
                   out_shardings=parallel.batch_sharding(mesh),
                   compiler_options=step_lib.compiler_options(mesh, "memory"))


def build_cache(model, params, qstate, batches, *, mesh, total=None, flip=True):
    """Features of this process's training examples -> {"student", "teacher": float32
    [n, V, E], "label": int32 [n], "index": int64 [n]} (numpy): with `flip` both views
    (V = 2), else the images as given (V = 1; `stack_views` joins several such caches of
    random crops); `index` is each example's position in the split (for `gather`).

    `batches` are this process's padded and masked batches in order
    (`data.create_dataset(..., train=False)` on the training split, `augment_view` for crops).
    """
    encoder = make_encoder(model, mesh, flip=flip)
    spec = jax.sharding.PartitionSpec(parallel.DATA)
    parts = {name: [] for name in PART_FIELDS}
    for batch in tqdm.tqdm(batches, total=total, desc="feature cache", unit="batch",
                           disable=jax.process_index() != 0, leave=False):
        out = encoder(params, qstate, parallel.to_global(batch["image"], mesh))
        local = multihost_utils.global_array_to_host_local_array(out, mesh, spec)
        keep = np.asarray(batch["mask"], bool)
        for name in ("student", "teacher"):
            parts[name].append(np.asarray(local[name], np.float32)[keep])
        parts["label"].append(np.asarray(batch["label"], np.int32)[keep])
        parts["index"].append(np.asarray(batch["index"], np.int64)[keep])
    if not parts["label"]:
        raise ValueError("feature cache: the training split yielded no batches")
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def stack_views(caches):
    """Caches of the same examples in the same order, one view each -> one cache of all."""
    first = caches[0]
    if any(not np.array_equal(c[k], first[k]) for c in caches for k in ("label", "index")):
        raise ValueError("feature cache views: the passes over the training split differ")
    return {"student": np.concatenate([c["student"] for c in caches], axis=1),
            "teacher": np.concatenate([c["teacher"] for c in caches], axis=1),
            "label": first["label"], "index": first["index"]}


def gather(part):
    """This process's part of the cache -> the whole cache ({FIELDS}, in split order) on every
    process. One process's part already is in order and is returned as is (memory-mapped
    arrays stay so); several processes' parts are exchanged (`process_allgather`, padded to
    the longest part) and merged by `index`."""
    index = np.asarray(part["index"])
    if jax.process_count() == 1:
        if np.any(np.diff(index) <= 0):
            raise ValueError("feature cache: examples out of split order")
        return {name: part[name] for name in FIELDS}
    sizes = multihost_utils.process_allgather(np.int64(len(index)))
    longest = int(np.max(sizes))

    def padded(x):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((longest - len(x), *x.shape[1:]), x.dtype)])

    every = multihost_utils.process_allgather({k: padded(part[k]) for k in PART_FIELDS})
    merged = {k: np.concatenate([v[p, :n] for p, n in enumerate(sizes)]) for k, v in every.items()}
    order = np.argsort(merged["index"], kind="stable")
    if np.any(np.diff(merged["index"][order]) <= 0):
        raise ValueError("feature cache: the processes' parts overlap")
    return {name: merged[name][order] for name in FIELDS}


def cache_key(**what):
    """A short hash of everything the cached features depend on (JSON-serializable values
    and arrays), so a cache built for another model, quantization or dataset is never read."""
    digest = hashlib.sha256()
    for key in sorted(what):
        digest.update(key.encode())
        for leaf in jax.tree.leaves(what[key]):
            if isinstance(leaf, (np.ndarray, jax.Array)):
                digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
            else:
                digest.update(json.dumps(leaf, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _process_dir(directory):
    return pathlib.Path(directory) / f"process_{jax.process_index()}_of_{jax.process_count()}"


def save_cache(directory, cache, key):
    """Writes this process's part as .npy files, each atomically; the fingerprint last."""
    path = _process_dir(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).unlink(missing_ok=True)  # invalid until every array is in place
    for name in PART_FIELDS:
        with atomic.file(path / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, cache[name])
    atomic.write_text(path / _MARKER, json.dumps({"key": key}))


def load_cache(directory, key):
    """This process's part if one was saved under `key` (memory-mapped), else None."""
    path = _process_dir(directory)
    try:
        stored = json.loads((path / _MARKER).read_text())["key"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
    if stored != key or not all((path / f"{name}.npy").exists() for name in PART_FIELDS):
        logging.info("feature cache in %s is for another setup; rebuilding it", path)
        return None
    return {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in PART_FIELDS}


class CachedInput:
    """Training batches sampled from the whole feature cache (`gather`), a function of
    (seed, step) alone.

    Epoch e visits the examples in the order of a permutation seeded by (seed, e); with
    `random_view` each example's view (of the V the cache holds: as is / flipped, or random
    crops) is drawn per step, else view 0 is used. An epoch is `num_examples //
    global_batch` steps; the rest of the permutation is dropped. Each process takes its
    slice of every global batch, so any number of processes trains on the same batches.
    (The seeds end in 0, where the process index was when each process sampled its own part:
    single-process runs draw what they drew then.)
    """

    def __init__(self, cache, *, global_batch, num_examples, seed, random_view=True):
        self.cache = cache
        self.global_batch = global_batch
        self.local_batch = global_batch // jax.process_count()
        self.steps_per_epoch = num_examples // global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.batch_size={global_batch} exceeds the {num_examples} "
                             "training examples")
        self.seed, self.random_view = seed, random_view
        self._epoch, self._order = None, None

    def batch(self, step):
        """This process's part of the global batch of `step` (numpy)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, 0])
            self._epoch, self._order = epoch, rng.permutation(len(self.cache["label"]))
        rows = np.sort(self._order[index * self.global_batch:(index + 1) * self.global_batch])
        if self.random_view:
            rng = np.random.default_rng([self.seed, step, 0, 1])
            views = rng.integers(0, self.cache["student"].shape[1], len(rows))
        else:
            views = np.zeros(len(rows), np.int64)
        mine = slice(jax.process_index() * self.local_batch,
                     (jax.process_index() + 1) * self.local_batch)
        rows, views = rows[mine], views[mine]
        return {"student": np.asarray(self.cache["student"][rows, views]),
                "teacher": np.asarray(self.cache["teacher"][rows, views]),
                "label": np.asarray(self.cache["label"][rows])}


def uses_cache(config):
    """Whether training reads cached image features: `speed.feature_cache` with
    `data.augment="flip"`, whose two views per image the cache holds exactly. Random crops
    ("coop") are new every step, so their images are encoded in the step, unless
    `speed.feature_cache_views` = N > 0 asks for N random crops per image, cached once (an
    approximation: the training then sees N crops of each image, not a fresh one each time)."""
    if not config.speed.feature_cache:
        return False
    return config.data.augment == "flip" or config.speed.feature_cache_views > 0


def _run_cache_key(config, model, qstate):
    """`cache_key` of what a run's cached features depend on: the model, the quantization
    and the training images (data fields, image size and views)."""
    return cache_key(
        checkpoint=config.model.checkpoint, seed=config.seed, model=model.config.to_dict(),
        data={k: config.data[k] for k in ("name", "num_shots", "shot_seed", "folder", "root",
                                          "subsample", "synthetic_classes",
                                          "synthetic_examples", "validation")},
        image_size=model.config.vision.image_size, augment=config.data.augment,
        flip=config.data.flip, views=config.speed.feature_cache_views,
        quant=None if qstate is None else (qstate.config.name, qstate.acts, qstate.weights,
                                           qstate.compensation))


def cached_input(config, *, model, params, qstate, mesh, workdir):
    """The training input of cached student/teacher image features (for a config that
    `uses_cache`): read back from `speed.cache_dir` (default WORKDIR/feature_cache) when it
    holds the features of this model, quantization and data, else built with the image
    towers and saved -> a `CachedInput`. Afterwards training needs no image tower, and a
    quantized student no FP kernel of its quantized layers (the teacher's features are
    cached)."""
    image_size = model.config.vision.image_size
    key = _run_cache_key(config, model, qstate)
    directory = config.speed.cache_dir or pathlib.Path(workdir) / "feature_cache"
    cache = load_cache(directory, key)
    crops = config.data.augment != "flip"
    if cache is None:
        encoder_state = integer.inference_state(qstate, params, config.quant.integer)
        batch_size = config.eval.batch_size
        total = data.num_eval_batches(config.data, split="train", batch_size=batch_size)

        def one_pass(view):
            ds = data.create_dataset(config.data, split="train", batch_size=batch_size,
                                     image_size=image_size, train=False, seed=config.seed,
                                     augment_view=view)
            return build_cache(model, params, encoder_state, data.as_numpy_batches(ds),
                               mesh=mesh, total=total, flip=not crops)

        if crops:
            views = config.speed.feature_cache_views
            logging.warning("feature cache of %d random %s views per image: an approximation "
                            "of training on a fresh view every step", views, config.data.augment)
            cache = stack_views([one_pass(v) for v in range(views)])
        else:
            cache = one_pass(None)
        save_cache(directory, cache, key)
        logging.info("feature cache: %d examples x %d views -> %s", len(cache["label"]),
                     cache["student"].shape[1], directory)
    return CachedInput(gather(cache), global_batch=config.train.batch_size,
                       num_examples=data.num_examples(config.data, split="train"),
                       seed=config.seed, random_view=crops or config.data.flip)
