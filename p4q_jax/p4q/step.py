"""P4Q's train step: learned prompts through the frozen quantized text tower, the QAdapter on
cached quantized image features, cross-entropy + distillation from the FP teacher.

Both image towers are frozen, so a batch carries image *features*: the quantized
student's and the FP teacher's (computed once per image and flip, see DESIGN.md). Per
step only the text tower runs (forward + backward) over the class prompts, plus the
adapter. The step is one `jax.jit` with explicit shardings: the batch split over the
mesh's `data` axis, everything else replicated, the train state donated.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax

from p4q_jax import parallel
from p4q_jax.clip import encode
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import losses
from p4q_jax.p4q import prompts as prompts_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossWeights:
    cross_entropy: float = 1.0
    distillation: float = 1.0
    distillation_kind: str = "kl"  # kl | official | none
    temperature: float = 1.0


@flax.struct.dataclass
class Frozen:
    """Everything the step reads but never changes (replicated on the mesh)."""

    params: dict  # FP CLIP params
    qstate: object  # the text tower's QState (or None for FP CoOp)
    token_embeddings: jax.Array  # [C, L, D] of the prompt layouts
    eot: jax.Array  # [C]
    teacher_text: jax.Array  # [C, E] FP zero-shot ensemble, normalized
    logit_scale: jax.Array  # exp(CLIP's logit_scale)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict  # {"context": [n_ctx, D] or [C, n_ctx, D], "adapter": params or None}
    opt_state: optax.OptState


def optimizer(*, prompt_lr, adapter_lr, total_steps, final_fraction=1e-3, adapter_eps=1e-4,
              adapter_weight_decay=0.01):
    """The official optimizers: prompts SGD, adapter AdamW, each with cosine decay."""
    prompt_schedule = optax.cosine_decay_schedule(prompt_lr, total_steps, alpha=final_fraction)
    adapter_schedule = optax.cosine_decay_schedule(adapter_lr, total_steps)
    return optax.multi_transform(
        {"context": optax.sgd(prompt_schedule),
         "adapter": optax.adamw(adapter_schedule, eps=adapter_eps,
                                weight_decay=adapter_weight_decay)},
        {"context": "context", "adapter": "adapter"})


def init_state(trainable, tx):
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=tx.init(trainable))


def class_text_features(model, frozen, prompts, context):
    """Class prompt features [C, E] through the (quantized) text tower."""
    x = prompts_lib.embed(prompts, frozen.token_embeddings, context)
    return encode.apply(model, frozen.params, (x, frozen.eot), qstate=frozen.qstate,
                        method=lambda m, a: m.encode_text_embeddings(*a))


def loss_fn(trainable, frozen, batch, *, model, prompts, adapter, weights):
    """(total loss, {term: value}) for one batch of cached image features."""
    text = class_text_features(model, frozen, prompts, trainable["context"])
    student = batch["student"]
    if trainable.get("adapter") is not None:
        student = adapter_lib.train_apply(adapter, trainable["adapter"], student)
    logits = losses.cosine_logits(student, text, frozen.logit_scale)
    teacher_logits = losses.cosine_logits(batch["teacher"], frozen.teacher_text,
                                          frozen.logit_scale)
    terms = {
        "cross_entropy": losses.cross_entropy(logits, batch["label"]),
        "distillation": losses.distillation(weights.distillation_kind, logits, teacher_logits,
                                            temperature=weights.temperature),
    }
    total = (weights.cross_entropy * terms["cross_entropy"]
             + weights.distillation * terms["distillation"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return total, {**terms, "loss": total, "train_accuracy": accuracy}


def make_train_step(*, model, prompts, adapter, tx, weights, mesh):
    """A jitted (state, frozen, batch) -> (state, metrics), batch sharded over `data`."""

    def step(state, frozen, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.trainable, frozen, batch, model=model,
                                      prompts=prompts, adapter=adapter, weights=weights)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    replicated = parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(replicated, replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
