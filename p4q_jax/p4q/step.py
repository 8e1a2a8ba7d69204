"""P4Q's train step: learned prompts through the frozen quantized text tower, the QAdapter on
cached quantized image features, cross-entropy + distillation from the FP teacher.

Both image towers are frozen, so a batch normally carries image *features*: the quantized
student's and the FP teacher's, cached once per image and flip (`p4q.features`;
docs/design.md, "Speed rules"). Per step only the text tower runs (forward + backward) over
the class prompts, plus the adapter. A batch of raw images ({"image", "label"}) also works:
both towers then run inside the step (the cache switched off).

The text tower runs on the prompts' positions up to the last EOT (`prompts.build`) and,
with `shared_prefix`, encodes the context prefix common to all classes once.

The step is one `jax.jit` with explicit shardings: the batch split over the mesh's
`data` axis, everything else replicated, the train state donated. On CPU devices its XLA
program is scheduled for concurrency or for memory (`xla_schedule`).
"""

import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
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
    distillation_kind: str = "official"  # official | kl | none
    temperature: float = 1.0
    contrastive: float = 0.0  # optional symmetric image/class-prompt term


def loss_weights(loss_config):
    """The step's LossWeights from the config's `loss` section (its other fields, such as
    `teacher`, say where the teacher comes from, not how the terms are weighted)."""
    names = {f.name for f in dataclasses.fields(LossWeights)}
    return LossWeights(**{k: v for k, v in loss_config.items() if k in names})


@flax.struct.dataclass
class Frozen:
    """Everything the step reads but never changes (placed by `parallel.weight_shardings`)."""

    params: dict  # FP CLIP params
    qstate: object  # the towers' QState (None: FP CoOp); the image tower's is used only
                    # when the batch carries images instead of cached features
    token_embeddings: jax.Array  # [C, L, D] of the prompt layouts
    eot: jax.Array  # [C]
    teacher_text: jax.Array  # [C, E] the teacher's class features, normalized
    logit_scale: jax.Array  # exp(CLIP's logit_scale)
    # A trained teacher's frozen adapter {"params", "qstate"} (None: the zero-shot teacher)
    teacher_adapter: dict | None = None


def make_frozen(model, params, qstate, prompts, teacher_text=None, *, image_towers=False,
                train=False, teacher_adapter=None):
    """The step's frozen inputs. Without `image_towers` (batches of cached features) only the
    text tower is kept, with its quantized kernels swapped in once: the image tower's
    weights and the text tower's FP kernels are not held in device memory. `teacher_text`
    may be None where no loss is computed (class features for evaluation). With `train`,
    the quantized matmuls multiply dequantized values (`QState.codes=False`: no per-step
    codes of the frozen kernels); for evaluation they run on codes, as the int8 path.
    `teacher_adapter`: a trained teacher's adapter state (`teacher.Teacher.adapter_state`)."""
    if train and qstate is not None:
        qstate = qstate.replace(codes=False)
    if not image_towers:
        params = {name: p for name, p in params.items() if name != "visual"}
        if qstate is not None:
            params, qstate = qstate.text_only(params)
    return Frozen(
        params=params, qstate=qstate,
        token_embeddings=encode.apply(model, params, prompts.tokens, method=model.embed_tokens),
        eot=jnp.asarray(prompts.eot),
        teacher_text=None if teacher_text is None else jnp.asarray(teacher_text),
        logit_scale=jnp.exp(params["logit_scale"]), teacher_adapter=teacher_adapter)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict  # {"context": [n_ctx, D] or [C, n_ctx, D], "adapter": params or None}
    opt_state: optax.OptState


def schedules(*, prompt_lr, adapter_lr, total_steps, final_fraction=1e-3, warmup_steps=0):
    """Learning-rate schedules {"context", "adapter"}: optional linear warm-up, then cosine."""

    def schedule(peak, end):
        if warmup_steps:
            return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end)
        return optax.cosine_decay_schedule(peak, total_steps, alpha=end / peak if peak else 0.0)

    return {"context": schedule(prompt_lr, prompt_lr * final_fraction),
            "adapter": schedule(adapter_lr, 0.0)}


# config.train.schedule: `schedules`, `epoch_cosine_schedules`, `official_stage_schedules`.
SCHEDULES = ("cosine", "coop", "official_stages")
# CoOp's epochs by shots (its COOP.md: *_ep50 configs for 1 shot, *_ep100 for 2 and 4, the
# 200-epoch ones for 8 and 16; *_ep50 for every ImageNet setting).
COOP_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
COOP_IMAGENET_EPOCHS = 50


def epoch_cosine_schedules(*, prompt_lr, adapter_lr, steps_per_epoch, epochs, warmup_epochs=1,
                           warmup_lr=1e-5):
    """CoOp's schedules {"context", "adapter"} (Dassl's, stepped once per epoch).

    Epochs [0, warmup_epochs) run at the constant `warmup_lr` (Dassl's
    ConstantWarmupScheduler); epoch e >= warmup_epochs at peak * (1 + cos(pi * (e -
    warmup_epochs) / epochs)) / 2: CosineAnnealingLR(T_max=epochs) started afresh after the
    warm-up (WARMUP_RECOUNT), so it never reaches 0 within `epochs` epochs.
    """

    def schedule(peak):
        def lr(step):
            epoch = step // steps_per_epoch
            cosine = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * (epoch - warmup_epochs) / epochs))
            return jnp.where(epoch < warmup_epochs, warmup_lr, cosine)
        return lr

    return {"context": schedule(prompt_lr), "adapter": schedule(adapter_lr)}


STAGE_EPOCHS_EXPECTED = ("expected increasing positive epoch counts, the epoch each stage "
                         "ends at, e.g. (1, 5, 10, 20, 50, 100)")


def valid_stage_epochs(stage_epochs):
    """Whether `train.stage_epochs` is a non-empty increasing tuple of positive ints."""
    epochs = tuple(stage_epochs)
    return bool(epochs) and all(isinstance(e, int) and e >= 1 for e in epochs) and all(
        b > a for a, b in zip(epochs, epochs[1:]))


def stage_ends(stage_epochs, *, steps_per_epoch, total_steps):
    """The steps at which the stages of `train.stage_epochs` (the epochs each stage ends at,
    increasing) end; the last must be the run's end."""
    epochs = tuple(stage_epochs)
    if not valid_stage_epochs(epochs):
        raise ValueError(f"train.stage_epochs={epochs}: {STAGE_EPOCHS_EXPECTED}")
    ends = tuple(e * steps_per_epoch for e in epochs)
    if ends[-1] != total_steps:
        raise ValueError(f"train.stage_epochs={epochs} ends at epoch {epochs[-1]} ({ends[-1]} "
                         f"steps of {steps_per_epoch} per epoch), but the run has "
                         f"{total_steps} steps (train.epochs / train.num_steps): the last "
                         "stage must end with the run")
    return ends


def official_stage_schedules(*, prompt_lr, adapter_lr, stage_ends, final_fraction=1e-3):
    """The public code's staged schedules {"context", "adapter"}, as a function of the global
    step n (`stage_ends`: the step each stage ends at; stage k runs [start_k, end_k)).

    Each stage is a new run of its main.py that rebuilds both schedulers over the stage's
    full horizon end_k (`--coop_epochs` = `--adapter_epochs` = its end epoch), from the
    resumed weights, and trains only the epochs after the resumed one:
    * prompts (its `build_cosine_scheduler`, indexed by the global iteration): cosine from
      prompt_lr to final_fraction x prompt_lr over end_k, at n; a resumed stage starts
      part-way down its cosine;
    * adapter (a fresh `CosineAnnealingLR(T_max=end_k)`, stepped once per iteration of this
      run): adapter_lr x (1 + cos(pi (n - start_k) / end_k)) / 2; it restarts at the peak.
    """
    ends = jnp.asarray(stage_ends, jnp.float32)
    starts = jnp.concatenate([jnp.zeros(1, jnp.float32), ends[:-1]])
    final = prompt_lr * final_fraction

    def stage(step):
        k = jnp.minimum(jnp.searchsorted(ends, step, side="right"), len(stage_ends) - 1)
        return starts[k], ends[k]

    def context(step):
        _, end = stage(step)
        return final + 0.5 * (prompt_lr - final) * (1.0 + jnp.cos(jnp.pi * step / end))

    def adapter(step):
        start, end = stage(step)
        return 0.5 * adapter_lr * (1.0 + jnp.cos(jnp.pi * (step - start) / end))

    return {"context": context, "adapter": adapter}


class ResetState(NamedTuple):
    count: jax.Array  # updates so far
    inner: optax.OptState


def reset_at(inner, steps):
    """`inner` with its state re-initialised before the update of each step in `steps`
    (counted from 0): an optimizer rebuilt at the stage boundaries of a staged run, as a new
    PyTorch optimizer starts with fresh moments and step count. The fresh state is
    `inner.init` of the updates (the parameters' shapes and dtypes)."""
    steps = jnp.asarray(sorted(steps), jnp.int32)

    def init(params):
        return ResetState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None):
        reset = jnp.any(state.count == steps)
        inner_state = jax.tree.map(lambda fresh, old: jnp.where(reset, fresh, old),
                                   inner.init(updates), state.inner)
        updates, inner_state = inner.update(updates, inner_state, params)
        return updates, ResetState(count=optax.safe_increment(state.count), inner=inner_state)

    return optax.GradientTransformation(init, update)


def optimizer(lr_schedules, *, adapter_eps=1e-4, adapter_weight_decay=0.01, clip_norm=None,
              train_prompts=True, prompt_momentum=0.0, prompt_weight_decay=0.0, reset_steps=()):
    """The official optimizers: prompts SGD, adapter AdamW (optionally after global-norm
    clipping); `train_prompts=False` keeps the context fixed (the adapter-only ablation).

    `prompt_momentum` and `prompt_weight_decay` make the prompts' SGD PyTorch's
    `SGD(momentum=m, weight_decay=wd)` (CoOp's, via Dassl: 0.9 and 5e-4): the decay is
    added to the gradient before the momentum buffer, whose update is scaled by the current
    learning rate. `reset_steps`: the steps before whose update the optimizers' moments
    (AdamW's, with its step count; the prompts' momentum) start afresh (`reset_at`); the
    learning-rate schedules keep counting global steps.
    """
    context = optax.set_to_zero()
    if train_prompts:
        context = optax.sgd(lr_schedules["context"], momentum=prompt_momentum or None)
        if prompt_momentum and reset_steps:
            context = optax.chain(reset_at(optax.trace(decay=prompt_momentum), reset_steps),
                                  optax.scale_by_learning_rate(lr_schedules["context"]))
        if prompt_weight_decay:
            context = optax.chain(optax.add_decayed_weights(prompt_weight_decay), context)
    adapter = optax.adamw(lr_schedules["adapter"], eps=adapter_eps,
                          weight_decay=adapter_weight_decay)
    if reset_steps:  # optax.adamw's chain, its moments reset
        adapter = optax.chain(reset_at(optax.scale_by_adam(eps=adapter_eps), reset_steps),
                              optax.add_decayed_weights(adapter_weight_decay),
                              optax.scale_by_learning_rate(lr_schedules["adapter"]))
    tx = optax.multi_transform({"context": context, "adapter": adapter},
                               {"context": "context", "adapter": "adapter"})
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def init_state(trainable, tx):
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=tx.init(trainable))


def class_text_features(model, frozen, prompts, context, *, shared_prefix=True, length_buckets=1):
    """Class prompt features [C, E] through the (quantized) text tower.

    With `shared_prefix` and a shared context, the positions every prompt starts with are
    encoded once (`CLIP.encode_text_prefixed`). With `length_buckets` > 1 the classes run
    in at most that many groups, each padded only to its own longest prompt
    (`prompts.length_buckets`). Either way the result is the same math.
    """
    x = prompts_lib.embed(prompts, frozen.token_embeddings, context)
    length = prompts.shared_prefix
    prefixed = shared_prefix and context.ndim == 2 and length
    start = length if prefixed else 0

    def encode_rows(rows, eot):
        if prefixed:
            return encode.apply(model, frozen.params, (x[0, :length], rows, eot - length),
                                qstate=frozen.qstate,
                                method=lambda m, a: m.encode_text_prefixed(*a))
        return encode.apply(model, frozen.params, (rows, eot), qstate=frozen.qstate,
                            method=lambda m, a: m.encode_text_embeddings(*a))

    groups = prompts_lib.length_buckets(prompts.eot, start, max(length_buckets, 1))
    if len(groups) == 1:
        return encode_rows(x[:, start:], frozen.eot)
    features = [encode_rows(x[index, start:start + n], frozen.eot[index])
                for index, n in groups]
    order = np.concatenate([index for index, _ in groups])
    return jnp.concatenate(features)[np.argsort(order)]


def paired_image_features(model, params, qstate, images):
    """{"student": quantized image features, "teacher": FP image features} of a batch."""
    method = model.encode_image
    return {"student": encode.apply(model, params, images, method=method, qstate=qstate),
            "teacher": encode.apply(model, params, images, method=method)}


def loss_fn(trainable, frozen, batch, *, model, prompts, adapter, weights, shared_prefix=True,
            train_prompts=True, length_buckets=1, teacher_adapter=None):
    """(total loss, {term: value}) for one batch of cached image features (or images).

    The teacher's logits are its image features (FP; through `teacher_adapter`, a trained
    teacher's frozen QAdapter, if given) against `frozen.teacher_text`."""
    context = trainable["context"]
    if not train_prompts:
        context = jax.lax.stop_gradient(context)  # no backward pass through the text tower
    text = class_text_features(model, frozen, prompts, context, shared_prefix=shared_prefix,
                               length_buckets=length_buckets)
    if "image" in batch:
        batch = {**batch, **jax.lax.stop_gradient(
            paired_image_features(model, frozen.params, frozen.qstate, batch["image"]))}
    student = batch["student"]
    if trainable.get("adapter") is not None:
        student = adapter_lib.train_apply(adapter, trainable["adapter"], student)
    logits = losses.cosine_logits(student, text, frozen.logit_scale)
    teacher = batch["teacher"]
    if teacher_adapter is not None:
        teacher = adapter_lib.apply(teacher_adapter, frozen.teacher_adapter["params"], teacher,
                                    frozen.teacher_adapter["qstate"])
    teacher_logits = losses.cosine_logits(teacher, frozen.teacher_text, frozen.logit_scale)
    terms = {
        "cross_entropy": losses.cross_entropy(logits, batch["label"]),
        "distillation": losses.distillation(weights.distillation_kind, logits, teacher_logits,
                                            temperature=weights.temperature),
    }
    total = (weights.cross_entropy * terms["cross_entropy"]
             + weights.distillation * terms["distillation"])
    if weights.contrastive:
        terms["contrastive"] = losses.symmetric_contrastive(student, text, batch["label"],
                                                            frozen.logit_scale)
        total = total + weights.contrastive * terms["contrastive"]
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return total, {**terms, "loss": total, "train_accuracy": accuracy}


# config.speed.xla_schedule; "auto" picks "memory" from this many classes on (or with remat).
XLA_SCHEDULES = ("auto", "memory", "concurrency")
MEMORY_SCHEDULE_MIN_CLASSES = 500


def xla_schedule(choice, *, num_classes, remat="off"):
    """Resolves config.speed.xla_schedule -> "memory" or "concurrency".

    XLA:CPU schedules a program to run independent ops concurrently by default, starting
    each as early as it can; in a backward pass that keeps every saved activation alive at
    once and hoists rematerialised blocks (`speed.remat`) back into the forward pass, where
    they save nothing. Its memory-minimising schedule costs time where the concurrency
    pays (a few classes: a short step over few prompts) and saves memory where the saved
    activations dominate (many classes; docs/results.md, "ImageNet scale"). "auto" takes the
    memory schedule from `MEMORY_SCHEDULE_MIN_CLASSES` classes on, or with `remat` on.
    """
    if choice not in XLA_SCHEDULES:
        raise ValueError(f"speed.xla_schedule={choice!r}; expected one of {XLA_SCHEDULES}")
    if choice != "auto":
        return choice
    many = num_classes >= MEMORY_SCHEDULE_MIN_CLASSES
    return "memory" if many or remat != "off" else "concurrency"


def compiler_options(mesh, schedule):
    """`jax.jit`'s compiler_options for `schedule` ("memory" or "concurrency") on `mesh`
    (the train step's and the feature-cache encoder's): the scheduler switch is XLA:CPU's,
    so other platforms compile as they would."""
    if schedule not in XLA_SCHEDULES[1:]:
        raise ValueError(f"schedule={schedule!r}; expected 'memory' or 'concurrency'")
    if schedule == "concurrency" or mesh.devices.flat[0].platform != "cpu":
        return None
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def make_train_step(*, model, prompts, adapter, tx, weights, mesh, shared_prefix=True,
                    train_prompts=True, frozen_shardings=None, length_buckets=1,
                    schedule="concurrency", teacher_adapter=None):
    """A jitted (state, frozen, batch) -> (state, metrics), batch sharded over `data`.

    `frozen` is replicated unless `frozen_shardings` (`parallel.weight_shardings`) splits
    its large kernels over the mesh's `model` axis. `schedule`: "concurrency" (XLA's
    default) or "memory" (see `xla_schedule`). `teacher_adapter`: a trained teacher's
    QAdapter module (its state is `frozen.teacher_adapter`)."""

    def step(state, frozen, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.trainable, frozen, batch, model=model,
                                      prompts=prompts, adapter=adapter, weights=weights,
                                      shared_prefix=shared_prefix, train_prompts=train_prompts,
                                      length_buckets=length_buckets,
                                      teacher_adapter=teacher_adapter)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    replicated = parallel.replicated(mesh)
    frozen_shardings = replicated if frozen_shardings is None else frozen_shardings
    return jax.jit(step, in_shardings=(replicated, frozen_shardings,
                                       parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options(mesh, schedule))
