"""Zero-shot classification: prompt-ensemble text classifier and sharded accuracy.

The classifier is CLIP's: for each class, the normalized mean of the normalized text
features of its prompts ("a photo of a {class}." x templates). Evaluation is one jitted
step over a batch sharded on the mesh's `data` axis; the last batch is padded and the
padding is masked out, so the step compiles once and padding is never counted.

Functions take `variables = {"params": FP params, "qstate": a quant.QState or None}`,
so the same evaluator measures the FP and the quantized model.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from p4q_jax import clip
from p4q_jax import parallel


def normalize(x, axis=-1):
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def _apply(model, variables, x, *, method):
    return clip.encode.apply(model, variables["params"], x, method=method,
                             qstate=variables.get("qstate"))


@functools.lru_cache(maxsize=None)
def _text_encoder(model, mesh):
    """One jitted text encoder per (model, mesh): repeated classifier builds reuse it."""
    return jax.jit(
        lambda v, t: _apply(model, v, t, method=model.encode_text),
        in_shardings=(None, parallel.batch_sharding(mesh)),  # variables: as placed
        out_shardings=parallel.replicated(mesh),
    )


def encode_prompts(model, variables, tokens, *, mesh, batch_size):
    """Text features for many prompts, in fixed-size chunks sharded over `data` -> [N, E]."""
    parallel.check_batch_size(batch_size, mesh, name="text batch_size")
    tokens = clip.crop_to_eot(tokens)
    n = tokens.shape[0]
    padded = np.zeros((math.ceil(n / batch_size) * batch_size, tokens.shape[1]), np.int32)
    padded[:n] = tokens
    fn, sharding = _text_encoder(model, mesh), parallel.batch_sharding(mesh)
    chunks = [fn(variables, parallel.from_every_process(padded[i:i + batch_size], sharding))
              for i in range(0, len(padded), batch_size)]
    return jnp.concatenate(chunks)[:n]


def zeroshot_classifier(model, variables, prompts, *, mesh, batch_size=256):
    """prompts [C][T] strings -> class weights [C, E]: normalized ensemble of normalized features."""
    num_templates = {len(p) for p in prompts}
    if len(num_templates) != 1:
        raise ValueError(f"prompts: every class needs the same number of templates, got "
                         f"{sorted(num_templates)}")
    flat = [text for class_prompts in prompts for text in class_prompts]
    features = encode_prompts(model, variables, clip.tokenize(flat), mesh=mesh,
                              batch_size=batch_size)
    return ensemble(features, num_classes=len(prompts))


def ensemble(features, *, num_classes):
    """Prompt features [C * T, E] (class-major) -> class weights [C, E]."""
    features = normalize(features)
    return normalize(features.reshape(num_classes, -1, features.shape[-1]).mean(axis=1))


def make_eval_step(image_features_fn, *, mesh, num_classes):
    """A jitted step: (variables, classifier [C, E], batch) -> summed hit counts.

    Args:
      image_features_fn: (variables, images) -> image features [B, E] (FP, quantized,
        or adapted: the evaluator does not care which).
      mesh: the device mesh; the batch is sharded over `data`, the variables are taken as
        placed (`parallel.place_weights`: large kernels may be split over `model`).
      num_classes: C, for per-class counts (mean-per-class accuracy).
    """
    k = min(5, num_classes)

    def step(variables, classifier, batch):
        logits = normalize(image_features_fn(variables, batch["image"])) @ classifier.T
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        top = jax.lax.top_k(logits, k)[1]
        hit1 = (top[:, 0] == labels) * mask
        hitk = jnp.any(top == labels[:, None], axis=-1) * mask
        onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
        return {
            "count": mask.sum(),
            "top1": hit1.sum(),
            "top5": hitk.sum(),
            "class_count": onehot.sum(0),
            "class_top1": (onehot * hit1[:, None]).sum(0),
        }

    return jax.jit(
        step,
        # variables and classifier as placed (a classifier made with split params is split)
        in_shardings=(None, None, parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


def accuracy(step, variables, classifier, batches, *, mesh, total=None, desc="eval"):
    """Runs `step` over per-process numpy batches -> {"top1", "top5", "mean_per_class", "count"}.

    Every process must yield the same number of batches (the eval pipeline pads them so).
    `total` is the number of batches, for the progress bar.
    """
    totals = None
    progress = tqdm.tqdm(batches, total=total, desc=desc, unit="batch",
                         disable=jax.process_index() != 0, leave=False)
    for batch in progress:
        counts = step(variables, classifier, parallel.to_global(batch, mesh))
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.tree.map(np.asarray, totals)
    seen = totals["class_count"] > 0
    return {
        "count": int(totals["count"]),
        "top1": 100.0 * float(totals["top1"] / totals["count"]),
        "top5": 100.0 * float(totals["top5"] / totals["count"]),
        "mean_per_class": 100.0 * float(
            (totals["class_top1"][seen] / totals["class_count"][seen]).mean()),
    }


def image_tower(model):
    """The image tower (quantized when `variables["qstate"]` is set) as an `image_features_fn`."""
    return functools.partial(_apply, model, method=model.encode_image)
