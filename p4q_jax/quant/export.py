"""Real low-bit storage: integer kernels (4 bits and below packed two per byte) in Orbax.

A quantized model is written as
  integer/   {site: {"codes", "scale", "zero_point"}}: int8/uint8 codes, or uint8 bytes
             holding two 4-bit (or narrower) codes each; scales per output channel;
  float/     {"params": the FP params that are not quantized kernels,
              "acts": {site: {"scale", "zero_point"}}};
  compensation/  (a compensated QState only, `quant.compensation`) {block: {"kernel",
             "bias"}}, float32 as the forward uses them;
  p4q_quant.json  the CLIP config, the QConfig, each kernel's shape and format, and the
             compensated blocks.
Loading dequantizes the codes with the same formula the fake-quant forward uses, so
the reloaded model's features are bit-identical to the calibrated one's.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from p4q_jax import atomic
from p4q_jax import clip
from p4q_jax.clip import storage
from p4q_jax.quant import primitives
from p4q_jax.quant import qconfig as qconfig_lib
from p4q_jax.quant import sites
from p4q_jax.quant import state as state_lib

MARKER = "p4q_quant.json"
PACKED_BITS = 4  # formats this narrow are stored two codes per byte


def pack_nibbles(codes):
    """Integer codes in [-8, 15] -> uint8 bytes, two codes per byte (low nibble first)."""
    flat = np.asarray(codes, np.int16).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed, *, shape, signed):
    """Inverse of `pack_nibbles` -> int8 codes of `shape`."""
    packed = np.asarray(packed, np.uint8)
    flat = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1).astype(np.int16)
    if signed:
        flat = np.where(flat >= 8, flat - 16, flat)
    return flat[: int(np.prod(shape))].reshape(shape).astype(np.int8)


def _storage_dtype(fmt):
    return np.int8 if fmt.signed else np.uint8


def save(path, model, params, qstate):
    """Writes a calibrated model with integer kernels -> {"integer_bytes", "fp32_bytes",
    "compensation_bytes"}.

    `fp32_bytes` is what the quantized kernels take as float32; `integer_bytes` is what
    their codes, scales and zero points take on disk (the `integer/` directory);
    `compensation_bytes` what the block compensation takes there (0 without one).
    """
    kernels = sites.kernels(params)
    integer, layout = {}, {}
    for name, p in qstate.weights.items():
        fmt = qstate.config.spec("weight", name).fmt
        # Codes of the calibrated fake-quantized kernel, not of the FP one: those sit on the
        # integer grid, whereas an FP value on a rounding tie may round either way.
        codes = np.asarray(primitives.quantize(qstate.kernels[name], p.scale, p.zero_point,
                                               fmt))
        packed = fmt.bits <= PACKED_BITS
        integer[name] = {
            "codes": pack_nibbles(codes) if packed else codes.astype(_storage_dtype(fmt)),
            "scale": p.scale, "zero_point": p.zero_point}
        layout[name] = {"shape": list(codes.shape), "packed": packed}
    flat = traverse_util.flatten_dict(params, sep="/")
    float_params = traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k.removesuffix("/kernel") not in integer}, sep="/")
    acts = {name: {"scale": p.scale, "zero_point": p.zero_point}
            for name, p in qstate.acts.items()}
    with atomic.directory(path) as tmp:
        storage.save_tree(tmp / "integer", integer)
        storage.save_tree(tmp / "float", {"params": float_params, "acts": acts})
        if qstate.compensation:
            storage.save_tree(tmp / "compensation", qstate.compensation)
        (tmp / MARKER).write_text(json.dumps({
            "clip_config": model.config.to_dict(),
            "qconfig": qstate.config.to_dict(),
            "kernels": layout,
            "compensation": sorted(qstate.compensation)}, indent=2))
    path = pathlib.Path(path)
    return {"integer_bytes": storage.bytes_on_disk(path / "integer"),
            "fp32_bytes": sum(4 * int(np.prod(kernels[n].shape)) for n in integer),
            "compensation_bytes": (storage.bytes_on_disk(path / "compensation")
                                   if qstate.compensation else 0)}


def load(path):
    """Reads what `save` wrote -> (model, params, qstate); features equal the saved model's."""
    path = pathlib.Path(path).absolute()
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path}: not a quantized p4q_jax model (no {MARKER})")
    meta = storage.read_json(path / MARKER)
    config = clip.CLIPConfig.from_dict(meta["clip_config"])
    qconfig = qconfig_lib.QConfig.from_dict(meta["qconfig"])
    integer = storage.restore_tree(path / "integer")
    floats = storage.restore_tree(path / "float")
    weights, kernels = {}, {}
    for name, stored in integer.items():
        fmt = qconfig.spec("weight", name).fmt
        shape = tuple(meta["kernels"][name]["shape"])
        codes = (unpack_nibbles(stored["codes"], shape=shape, signed=fmt.signed)
                 if meta["kernels"][name]["packed"] else np.asarray(stored["codes"]))
        p = state_lib.QParams(jnp.asarray(stored["scale"]), jnp.asarray(stored["zero_point"]))
        weights[name] = p
        kernels[name] = primitives.dequantize(jnp.asarray(codes, jnp.float32), p.scale,
                                              p.zero_point)
    flat = traverse_util.flatten_dict(floats["params"], sep="/")
    flat.update({name + "/kernel": k for name, k in kernels.items()})
    params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))
    acts = {n: state_lib.QParams(jnp.asarray(a["scale"]), jnp.asarray(a["zero_point"]))
            for n, a in floats["acts"].items()}
    compensation = {}
    if meta.get("compensation"):
        stored = storage.restore_tree(path / "compensation")
        if sorted(stored) != meta["compensation"]:
            raise clip.CheckpointError(
                f"{path / 'compensation'}: holds blocks {sorted(stored)}, but {MARKER} lists "
                f"{meta['compensation']}")
        compensation = jax.tree.map(jnp.asarray, stored)
    qstate = state_lib.QState(config=qconfig, acts=acts, weights=weights, kernels=kernels,
                              compensation=compensation)
    return clip.CLIP(config), params, qstate
