r"""Pretrains the demo's tiny CLIP on rendered shapes with captions, on a CPU, in minutes.

    python experiments/tiny_clip/pretrain.py --out=p4q_jax/assets/tiny_clip_shapes

The model is the project's own CLIP (`p4q_jax.clip`) at a small size, the captions go through the
project's tokenizer, and the loss is CLIP's symmetric contrastive loss with the learned
temperature. Every batch is rendered on the fly (`data.shapes.stream_seed`: seeds disjoint from
the TFDS splits), so no image is ever seen twice and the test split stays held out. The zero-shot
top-1 on the test split (the registry's prompt ensemble) is printed as it trains. The checkpoint
is written in the Orbax form with the command, seed, library versions and final metrics in its
`p4q_clip.json`.
"""
import importlib.metadata
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging

from p4q_jax import clip
from p4q_jax import evaluate
from p4q_jax.clip import transforms
from p4q_jax.data import registry
from p4q_jax.data import shapes
from p4q_jax.p4q import losses

_OUT = flags.DEFINE_string("out", None, "Where to write the Orbax checkpoint (must not exist).",
                           required=True)
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Image-caption pairs per step.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak AdamW learning rate (linear warm-up, cosine decay).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 100, "Warm-up steps.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and data-stream seed.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 250, "Steps between zero-shot evaluations.")

CONFIG = clip.architectures.vit(embed_dim=64, image_size=shapes.IMAGE_SIZE, patch_size=8,
                          vision_width=128, vision_layers=4, text_width=64, text_layers=4)
_MAX_TOKENS = 24  # the longest caption is 15 tokens with <sot> and <eot>
_VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def batch(seed, step, batch_size):
    """Step `step`'s (CLIP-normalized images, tokens), rendered from its own seeds."""
    label_seed, render_seed = shapes.stream_seed(seed, step)
    labels = np.random.default_rng(label_seed).integers(len(shapes.CLASS_NAMES), size=batch_size)
    images, captions = shapes.render(labels, seed=render_seed)
    tokens = np.asarray(clip.tokenize(captions))[:, :_MAX_TOKENS]
    return transforms.normalize(images), tokens


def contrastive_loss(model, params, images, tokens):
    """CLIP's symmetric cross-entropy over the batch's image-text cosine logits (each image's
    "class" is its own caption)."""
    img, txt, logit_scale = model.apply({"params": params}, images, tokens)
    return losses.symmetric_contrastive(img, txt, jnp.arange(len(img)), jnp.exp(logit_scale))


def make_optimizer(steps):
    schedule = optax.warmup_cosine_decay_schedule(0.0, _LR.value, _WARMUP.value, steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.adamw(schedule, b2=0.98, eps=1e-6, weight_decay=_WEIGHT_DECAY.value,
                       mask=decay_mask)


def zeroshot_top1(model, params, test_images, test_labels):
    """Top-1 (%) on the test split with the registry's template ensemble."""
    info = registry.get_info("shapes")
    texts = [t for group in registry.prompts(info.class_names, info.templates) for t in group]
    txt = clip.encode_text(model, params, clip.crop_to_eot(clip.tokenize(texts)))
    classes = evaluate.ensemble(txt, num_classes=info.num_classes)
    img = clip.encode_image(model, params, test_images)
    predictions = np.asarray(jnp.argmax(img @ classes.T, axis=-1))
    return float(100 * np.mean(predictions == test_labels))


def main(argv):
    del argv
    if not 0 <= _WARMUP.value < _STEPS.value:
        raise app.UsageError(f"--warmup_steps={_WARMUP.value} must be in [0, --steps="
                             f"{_STEPS.value}): the cosine decay needs steps after the warm-up.")
    start = time.time()
    model, params = clip.init(CONFIG, seed=_SEED.value)
    optimizer = make_optimizer(_STEPS.value)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, images, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: contrastive_loss(model, p, images, tokens))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # CLIP clips the temperature at 100.
        params["logit_scale"] = jnp.minimum(params["logit_scale"], jnp.log(100.0))
        return params, opt_state, loss

    test_images, test_labels, _ = shapes.split_examples("test")
    test_images = transforms.normalize(test_images)
    history = []
    for step in range(_STEPS.value):
        images, tokens = batch(_SEED.value, step, _BATCH.value)
        params, opt_state, loss = train_step(params, opt_state, images, tokens)
        history.append(loss)
        if (step + 1) % _EVAL_EVERY.value == 0 or step + 1 == _STEPS.value:
            recent = float(np.mean(jax.device_get(history[-_EVAL_EVERY.value:])))
            top1 = zeroshot_top1(model, params, test_images, test_labels)
            logging.info("step %d/%d  loss %.3f  zero-shot test top-1 %.1f%%  (%.0f s)",
                         step + 1, _STEPS.value, recent, top1, time.time() - start)
    provenance = {
        "command": " ".join(["python", *sys.argv]),
        "seed": _SEED.value,
        "steps": _STEPS.value,
        "batch_size": _BATCH.value,
        "final_loss": recent,
        "zeroshot_test_top1": top1,
        "train_seconds": round(time.time() - start, 1),
        "versions": {name: importlib.metadata.version(name) for name in _VERSIONS},
    }
    clip.save(_OUT.value, model.config, jax.device_get(params), provenance=provenance)
    logging.info("wrote %s: %s", _OUT.value, provenance)


if __name__ == "__main__":
    app.run(main)
