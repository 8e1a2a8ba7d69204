"""Device mesh and shardings: one code path for 1 CPU, fake CPU devices, a GPU, a TPU pod.

The mesh has a `data` axis (batch) and a `model` axis (for towers too large to
replicate); sizes come from the config, with -1 meaning "all remaining devices".
Frozen weights and quantization state are placed once by `place_weights` (large kernels
split over `model`, the rest replicated) and the jitted functions take them as placed;
batches are split over `data`.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"


def make_mesh(*, data=-1, model=1, devices=None):
    """A (data, model) mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"mesh.model={model} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // model
    if data * model != n:
        raise ValueError(f"mesh.data={data} x mesh.model={model} != {n} devices")
    return jax.make_mesh((data, model), (DATA, MODEL), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def replicated(mesh):
    return NamedSharding(mesh, P())


def weight_shardings(tree, mesh, *, min_size=2**16):
    """Shardings for frozen weights. With a `model` axis of size n > 1, every 2-D array of at
    least `min_size` entries whose last dimension n divides is split over `model` along it
    (tensor parallelism for towers that do not fit on one device; XLA inserts the
    collectives); everything else is replicated."""
    n = mesh.shape[MODEL]

    def sharding(x):
        if n > 1 and np.ndim(x) == 2 and x.shape[-1] % n == 0 and np.size(x) >= min_size:
            return NamedSharding(mesh, P(None, MODEL))
        return replicated(mesh)

    return jax.tree.map(sharding, tree)


def place_weights(tree, mesh, *, min_size=2**16):
    """Places frozen weights (params, quantization state) on the mesh once, laid out by
    `weight_shardings`; arrays already so placed are not copied."""
    return jax.device_put(tree, weight_shardings(tree, mesh, min_size=min_size))


def host_memory_is_separate():
    """Whether the devices' memory is not the host's (GPUs, TPUs): only then does moving
    arrays to host memory free any (on CPUs it is one RAM, and a copy out and back only
    costs time and, while both copies live, memory)."""
    return jax.devices()[0].platform != "cpu"


def to_host(tree):
    """Placed arrays -> the same layout in host memory (`pinned_host`), for a later phase:
    they take no device memory meanwhile, and `place_weights` brings them back."""
    return jax.device_put(
        tree, jax.tree.map(lambda x: x.sharding.with_memory_kind("pinned_host"), tree))


def bytes_per_device(tree):
    """(bytes of `tree` on its most loaded device, bytes of the whole tree)."""
    per_device, total = {}, 0
    for x in jax.tree.leaves(tree):
        total += x.nbytes
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0), total


def batch_sharding(mesh):
    """Leading (batch) dimension split over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def check_batch_size(batch_size, mesh, *, name="batch_size"):
    """Raises a clear error when a global batch cannot be split evenly over the mesh."""
    shards = mesh.shape[DATA]
    if batch_size % shards or batch_size % jax.process_count():
        raise ValueError(
            f"{name}={batch_size} must be divisible by the {shards} data-parallel devices "
            f"and the {jax.process_count()} processes")


def to_global(batch, mesh):
    """This process's slice of a batch (numpy) -> global arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def from_every_process(x, sharding):
    """An array every process holds in full (e.g. prompt tokens) -> a global array laid out
    by `sharding`; each process places only its own devices' parts."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree, mesh):
    """Places a pytree (same value on every process) on all devices of the mesh."""
    return jax.device_put(tree, replicated(mesh))
