"""The distillation teacher: the FP zero-shot classifier, or a trained full-precision export.

The paper distils from the FP CLIP's zero-shot classifier (`loss.teacher="zeroshot"`). Where
that classifier is weak on the downstream task (a shifted domain), its mistakes are what KL
distillation teaches; a teacher trained on the task's training split with the FP towers (a
CoOp-FP or FP P4Q run's export) knows the task. Its logits come from its own classifier on
the same images: its learned prompts through the FP text tower (computed once) against the
FP image features, through its frozen adapter if it has one (applied in the step).

A trained teacher must be of the student's base model (architecture and weights), its
classes in the same order, and trained on the student's dataset and training split: any
other is refused with the reason (`check_export`).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp

from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import classifier as classifier_lib

ZEROSHOT = "zeroshot"


class TeacherError(ValueError):
    """A teacher export that does not fit the student's run."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What the train step needs of the teacher, and where it came from."""

    text: jax.Array  # [C, E] normalized class features
    trained: classifier_lib.Trained | None  # the export's prompts and adapter (None: zero-shot)
    origin: dict  # {"kind": "zeroshot"} or {"kind": "export", "path", "method", ...}

    @property
    def adapter(self):
        return None if self.trained is None else self.trained.adapter

    @property
    def adapter_state(self):
        """{"params", "qstate"} of the teacher's frozen adapter, or None."""
        if self.adapter is None:
            return None
        return {"params": self.trained.adapter_params, "qstate": self.trained.adapter_qstate}

    def adapt_image_features(self, features):
        """The teacher's image features from the FP image tower's (its adapter applied)."""
        if self.adapter is None:
            return features
        return adapter_lib.apply(self.adapter, self.trained.adapter_params, features,
                                 self.trained.adapter_qstate)


def zeroshot(text):
    """The FP zero-shot ensemble's class features [C, E] as the teacher."""
    return Teacher(text=jnp.asarray(text), trained=None, origin={"kind": ZEROSHOT})


def check_export(path, meta, *, model_config, weights, class_names, data_origin):
    """Refuses an export that cannot teach this run (TeacherError naming the reason).

    Args:
      path: the export directory (for the messages).
      meta: its `p4q.json` (`trained.read_meta`).
      model_config: the student's CLIP config as a dict (`model.config.to_dict()`).
      weights: the student's base `classifier.weights_fingerprint`.
      class_names: the student's classes, in label order.
      data_origin: the student's training data (`data_origin` of the p4q job).
    """
    origin = meta.get("origin") or {}
    if meta.get("quantized"):
        raise TeacherError(f"loss.teacher={path}: a quantized export; the teacher must be a "
                           "full-precision run (p4q.quantize=False: CoOp-FP or FP P4Q)")
    if not origin.get("model") or not origin.get("data"):
        raise TeacherError(f"loss.teacher={path}: the export records no base model or training "
                           "data (an import, or written by an older version), so it cannot "
                           "be checked against this run; train the teacher again")
    if origin["model"]["config"] != model_config:
        difference = classifier_lib.config_difference(origin["model"]["config"], model_config)
        raise TeacherError(f"loss.teacher={path}: trained on another model architecture "
                           f"({difference})")
    if origin["model"]["weights"] != weights:
        raise TeacherError(f"loss.teacher={path}: trained on other weights of this "
                           f"architecture (fingerprint {origin['model']['weights']}, this run's "
                           f"{weights}): the teacher must start from the student's checkpoint")
    if tuple(meta["class_names"]) != tuple(class_names):
        raise TeacherError(f"loss.teacher={path}: trained on other classes "
                           f"({len(meta['class_names'])} classes, this run has "
                           f"{len(class_names)}; {_first_difference(meta['class_names'], class_names)})")
    taught = origin["data"]
    if taught.get("split") == data_origin["test_split"]:
        raise TeacherError(f"loss.teacher={path}: trained on the split {taught['split']!r}, "
                           "which is this run's test split")
    for field in ("dataset", "split", "num_shots", "shot_seed", "subsample"):
        if taught.get(field) != data_origin.get(field):
            raise TeacherError(f"loss.teacher={path}: trained on other data ({field} "
                               f"{taught.get(field)!r}, this run's {data_origin.get(field)!r})")


def _first_difference(theirs, ours):
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if a != b:
            return f"class {i} is {a!r} there, {b!r} here"
    return "one list is longer"


def from_export(path, *, model, params, class_names, data_origin, weights):
    """A trained FP export as the teacher (checked by `check_export`): its class features
    through `params`' FP text tower, which the fingerprint check makes the export's own."""
    meta = classifier_lib.read_meta(path)
    model_config = json.loads(json.dumps(model.config.to_dict()))  # as p4q.json stores it
    check_export(path, meta, model_config=model_config, weights=weights,
                 class_names=class_names, data_origin=data_origin)
    trained = classifier_lib.load_trained(path, meta)
    variables = {"params": params, "qstate": None, "context": trained.context}
    text = jax.jit(lambda v: trained.class_features(model, v))(variables)
    origin = meta["origin"]
    return Teacher(text=text, trained=trained, origin={
        "kind": "export", "path": str(path), "method": origin.get("method"),
        "recipe": origin.get("recipe")})
