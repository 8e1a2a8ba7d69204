"""A trained P4Q classifier: learned prompts + QAdapter on a (quantized) CLIP, saved and loaded.

    model, params, qstate, trained = p4q.classifier.load("runs/p4q/export")
    variables = trained.variables(params, qstate)
    text = trained.class_features(model, variables)             # [C, E], normalized
    image = trained.image_features(model, variables, images)    # [B, E]

An export directory holds
  towers/    the frozen CLIP: integer kernels + scales (`quant.export`) when quantized,
             the FP params (`clip.save`) otherwise; self-contained, no base checkpoint needed;
  trained/   the learned context and the adapter's params and frozen 8-bit state (Orbax);
  p4q.json   class names, prompt layout, adapter shape, and the run's origin: the base
             model (its architecture and `weights_fingerprint`), the data it trained on
             and its recipe (what a trained teacher is checked against, `p4q.teacher`).
  run.json   the run that wrote it (its workdir and config fingerprint): a run replaces
             only its own export (`preflight.check_export`).
"""

import dataclasses
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax import atomic
from p4q_jax import clip
from p4q_jax.clip import storage
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib
from p4q_jax.quant import export as quant_export
from p4q_jax.quant import state as state_lib

MARKER = "p4q.json"
RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class Trained:
    """What P4Q learned, and how its prompts are laid out."""

    class_names: tuple
    position: str  # class token position: end | middle | front
    context: jax.Array  # [n_ctx, D] or [C, n_ctx, D]
    adapter: adapter_lib.QAdapter | None
    adapter_params: dict | None
    adapter_qstate: state_lib.QState | None  # frozen 8-bit ranges (see adapter.py)
    # The CLIP architecture it was trained on (an export's origin; None: not recorded).
    model_config: dict | None = None

    @property
    def prompts(self):
        return prompts_lib.build(self.class_names, n_ctx=self.context.shape[-2],
                                 position=self.position)

    def for_classes(self, class_names):
        """The same learned context and adapter in front of other class names (cross-dataset
        transfer, CoCoOp's new classes). A class-specific context has one context per
        training class and no context for any other: refused."""
        class_names = prompts_lib.check_class_names(class_names)
        if class_names == self.class_names:
            return self
        if self.context.ndim == 3:
            raise ValueError(
                f"this model learned a class-specific context (one per each of its "
                f"{len(self.class_names)} training classes), which cannot be put in front of "
                f"other class names; train with p4q.class_specific=False to transfer it.")
        return dataclasses.replace(self, class_names=class_names)

    def variables(self, params, qstate):
        """The pytree the jitted evaluation functions take."""
        return {"params": params, "qstate": qstate, "context": self.context,
                "adapter": self.adapter_params, "adapter_qstate": self.adapter_qstate}

    def check_model(self, model):
        """Refuses a CLIP other than the one this was trained on (ValueError naming the first
        difference): its context and adapter would run on another model's features."""
        current = json.loads(json.dumps(model.config.to_dict()))  # as p4q.json stores it
        if self.model_config is not None and self.model_config != current:
            raise ValueError("these prompts and adapter were trained on another CLIP ("
                             f"{config_difference(self.model_config, current)}); load the "
                             "export's own towers (`classifier.load`)")
        width, embed = model.config.text.width, model.config.embed_dim
        if self.context.shape[-1] != width:
            raise ValueError(f"the learned context has width {self.context.shape[-1]}; this "
                             f"CLIP's text tower has width {width}")
        if self.adapter_params is not None:
            shapes = {tuple(k.shape) for k in jax.tree.leaves(self.adapter_params)}
            if not any(embed in shape for shape in shapes):
                raise ValueError(f"the adapter's weights {sorted(shapes)} do not take this "
                                 f"CLIP's {embed}-d features")

    def class_features(self, model, variables):
        """Normalized class prompt features [C, E] through the (quantized) text tower."""
        self.check_model(model)
        prompts = self.prompts
        frozen = step_lib.make_frozen(model, variables["params"], variables["qstate"], prompts)
        text = step_lib.class_text_features(model, frozen, prompts, variables["context"])
        return text / jnp.linalg.norm(text, axis=-1, keepdims=True)

    def image_features(self, model, variables, images):
        """Image features [B, E]: the (quantized) image tower, then the frozen adapter."""
        self.check_model(model)
        f = clip.encode.apply(model, variables["params"], images, method=model.encode_image,
                              qstate=variables["qstate"])
        if self.adapter is None:
            return f
        return adapter_lib.apply(self.adapter, variables["adapter"], f,
                                 variables["adapter_qstate"])


def _qstate_tree(qstate):
    return {"acts": {n: {"scale": p.scale, "zero_point": p.zero_point}
                     for n, p in qstate.acts.items()},
            "weights": {n: {"scale": p.scale, "zero_point": p.zero_point}
                        for n, p in qstate.weights.items()},
            "kernels": qstate.kernels}


def _qstate_from_tree(tree, config):
    qparams = lambda d: {n: state_lib.QParams(jnp.asarray(p["scale"]), jnp.asarray(p["zero_point"]))
                         for n, p in d.items()}
    return state_lib.QState(config=config, acts=qparams(tree["acts"]),
                            weights=qparams(tree["weights"]),
                            kernels=jax.tree.map(jnp.asarray, tree["kernels"]))


def config_difference(stored, current, prefix=""):
    """The first field in which two nested config dicts differ, as "field stored, this
    run's current" ("" when equal)."""
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = config_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} {a!r}, this run's {b!r}"
    return ""


def weights_fingerprint(params):
    """A short hash of a CLIP's weights: every array's path, shape and dtype and its first
    1,024 values. It tells checkpoints apart (any two trained or random CLIPs differ in
    those values) without reading every byte of a large model."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf.reshape(-1)[:1024])).tobytes())
    return digest.hexdigest()[:16]


def export_dir(config, workdir):
    """Where a run's export lives: `config.p4q.export_dir`, or WORKDIR/export by default."""
    return pathlib.Path(config.p4q.export_dir or pathlib.Path(workdir) / "export")


def save(path, model, params, qstate, trained, *, origin=None, run=None):
    """Writes the export directory -> its absolute path. Atomic: an existing export is replaced
    only once the new one is complete; a killed save's temporaries go on the next save.
    `origin` (JSON): where the model came from and how it was trained (`p4q.json`); `run`
    (JSON: which run writes it) goes to RUN_FILE."""
    path = pathlib.Path(path).absolute()
    with atomic.directory(path, replace=True) as tmp:
        if qstate is None:
            clip.save(tmp / "towers", model.config, params)
        else:
            quant_export.save(tmp / "towers", model, params, qstate)
        tree = {"context": trained.context}
        if trained.adapter is not None:
            tree["adapter"] = {"params": trained.adapter_params,
                               "state": _qstate_tree(trained.adapter_qstate)}
        storage.save_tree(tmp / "trained", tree)
        adapter = trained.adapter
        (tmp / MARKER).write_text(json.dumps({
            "class_names": list(trained.class_names),
            "position": trained.position,
            "quantized": qstate is not None,
            "adapter": None if adapter is None else {"reduction": adapter.reduction,
                                                     "ratio": adapter.ratio},
            "origin": origin,
        }, indent=2))
        if run is not None:
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True))
    return path


def read_meta(path):
    """The export's `p4q.json` (class names, layout, adapter, origin) -> dict."""
    path = pathlib.Path(path).absolute()
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path}: not a P4Q export (no {MARKER}); train with "
                                "`main.py --config=configs/p4q.py` first")
    return storage.read_json(path / MARKER)


def writer(path):
    """The `run` record an export was saved with, or None (none recorded)."""
    path = pathlib.Path(path) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load(path):
    """Reads an export directory -> (model, params, qstate or None, Trained)."""
    path = pathlib.Path(path).absolute()
    meta = read_meta(path)
    if meta["quantized"]:
        model, params, qstate = quant_export.load(path / "towers")
    else:
        (model, params), qstate = clip.load(path / "towers"), None
    return model, params, qstate, load_trained(path, meta)


def load_trained(path, meta=None):
    """What an export learned (context, adapter), without its towers -> Trained."""
    path = pathlib.Path(path).absolute()
    meta = meta or read_meta(path)
    tree = storage.restore_tree(path / "trained")
    adapter = adapter_params = adapter_qstate = None
    if meta["adapter"] is not None:
        adapter = adapter_lib.QAdapter(**meta["adapter"])
        adapter_params = jax.tree.map(jnp.asarray, tree["adapter"]["params"])
        adapter_qstate = _qstate_from_tree(tree["adapter"]["state"], adapter_lib.QCONFIG)
    origin = meta.get("origin") or {}
    return Trained(class_names=tuple(meta["class_names"]), position=meta["position"],
                   context=jnp.asarray(np.asarray(tree["context"])), adapter=adapter,
                   adapter_params=adapter_params, adapter_qstate=adapter_qstate,
                   model_config=(origin.get("model") or {}).get("config"))
