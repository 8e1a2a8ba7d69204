"""QAT baseline: the whole quantized CLIP fine-tuned with learned step sizes (LSQ), plus CoOp
prompts, on P4Q's loss, data and step budget.

What trains (`trainable`):
  params   every parameter of both towers (`visual`, `text`): the FP kernels of the
           quantized layers (fake-quantized with their learned steps in every forward
           pass) and everything left in float (embeddings, LayerNorms, biases, projections
           the config keeps in float); CLIP's `logit_scale` is not a tower's and stays fixed,
           as in P4Q;
  scales   every weight and activation step (`quant.lsq`), from the PTQ calibration; the
           zero points stay as calibrated (integers, which the integer export needs);
  context  CoOp's context vectors, initialised and optimized as P4Q's (no adapter).

Optimizers: AdamW on the towers (`qat.lr`, `qat.weight_decay`), Adam on the steps
(`qat.scale_lr`; no weight decay, which would pull every step towards 0; each update then
projected onto positive steps, `lsq.keep_positive`), the prompts as in
P4Q (SGD at `train.prompt_lr`, `train.prompt_momentum`, `train.prompt_weight_decay`); each
rate follows P4Q's cosine schedule (`train.warmup_steps`, then cosine over the run), after
optional global-norm clipping (`train.clip_norm`). The loss is P4Q's (`step.loss_fn`:
cross-entropy over cosine logits + the configured distillation from the FP teacher, whose
image features come from a frozen FP copy of the image tower). The towers change, so every
step encodes its images (no feature cache); the text tower runs without the shared prefix,
so each activation site sees one tensor per step (one N of LSQ's gradient scale).

The train state (parameters and both Adam moments) is laid out by the project's weight rule
(`parallel.weight_shardings`: 2-D arrays of at least `mesh.shard_min_size` entries split over
the mesh's `model` axis), the batch over `data`; the loop is P4Q's (`train.loop`:
checkpoints, exact resume).
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax

from p4q_jax import data
from p4q_jax import parallel
from p4q_jax import phases as phases_lib
from p4q_jax import train as train_lib
from p4q_jax.clip import encode
from p4q_jax.p4q import classifier as classifier_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib
from p4q_jax.quant import lsq

TOWERS = ("visual", "text")


@flax.struct.dataclass
class Fixed:
    """What the QAT step reads but does not train."""

    # The FP image tower (the teacher's image features) and CLIP's raw `logit_scale` (log of
    # 1/T), which the student shares.
    teacher_params: dict
    # Sites, formats and zero points; its scales are the calibrated steps, where the
    # trainable ones start and the floor `lsq.keep_positive` holds them above.
    quant: lsq.LSQState
    eot: jax.Array  # [C]
    teacher_text: jax.Array  # [C, E] the teacher's class features, normalized
    teacher_adapter: dict | None = None  # a trained teacher's frozen adapter state


def make_fixed(params, qstate, prompts, teacher):
    """The fixed inputs; the teacher's tower is a copy (the student's is trained in place)."""
    teacher_params = {name: params[name] for name in ("visual", "logit_scale")}
    return Fixed(teacher_params=jax.tree.map(jnp.array, teacher_params),
                 quant=lsq.from_qstate(qstate),
                 eot=jnp.asarray(prompts.eot), teacher_text=jnp.asarray(teacher.text),
                 teacher_adapter=teacher.adapter_state)


def initial_trainable(params, fixed, context):
    """The trainable tree, in new buffers: the train step donates it, and neither the
    caller's params nor `fixed` may go with it."""
    return jax.tree.map(jnp.array, {
        "params": {name: params[name] for name in TOWERS}, "scales": fixed.quant.scales(),
        "context": jnp.asarray(context, jnp.float32)})


def model_state(trainable, fixed):
    """(CLIP params, LSQState) of a trainable tree: the student the step runs."""
    params = {**trainable["params"], "logit_scale": fixed.teacher_params["logit_scale"]}
    return params, fixed.quant.with_scales(trainable["scales"])


def loss_fn(trainable, fixed, batch, *, model, prompts, weights, teacher_adapter=None):
    """P4Q's loss (`step.loss_fn`) of a batch of images {"image", "label"}, with the student's
    image and class features through the LSQ-quantized towers of `trainable`."""
    params, quant = model_state(trainable, fixed)
    frozen = step_lib.Frozen(
        params=params, qstate=quant,
        token_embeddings=encode.apply(model, params, prompts.tokens, method=model.embed_tokens),
        eot=fixed.eot, teacher_text=fixed.teacher_text,
        logit_scale=jnp.exp(params["logit_scale"]), teacher_adapter=fixed.teacher_adapter)
    images = batch["image"]
    features = {
        "student": encode.apply(model, params, images, method=model.encode_image, qstate=quant),
        "teacher": jax.lax.stop_gradient(encode.apply(
            model, fixed.teacher_params, images, method=model.encode_image)),
        "label": batch["label"]}
    return step_lib.loss_fn({"context": trainable["context"], "adapter": None}, frozen,
                            features, model=model, prompts=prompts, adapter=None,
                            weights=weights, shared_prefix=False,
                            teacher_adapter=teacher_adapter)


def schedules(config, total_steps):
    """{"context", "params", "scales"}: P4Q's prompt schedule, cosine for the other two."""
    tcfg, cfg = config.train, config.qat
    common = dict(total_steps=total_steps, final_fraction=tcfg.prompt_final_fraction,
                  warmup_steps=tcfg.warmup_steps)
    towers = step_lib.schedules(prompt_lr=train_lib.prompt_lr(tcfg), adapter_lr=cfg.lr,
                                **common)
    steps = step_lib.schedules(prompt_lr=train_lib.prompt_lr(tcfg), adapter_lr=cfg.scale_lr,
                               **common)
    return {"context": towers["context"], "params": towers["adapter"],
            "scales": steps["adapter"]}


def optimizer(config, lrs):
    """The QAT optimizers (see the module docstring)."""
    tcfg = config.train
    context = optax.sgd(lrs["context"], momentum=tcfg.prompt_momentum or None)
    if tcfg.prompt_weight_decay:
        context = optax.chain(optax.add_decayed_weights(tcfg.prompt_weight_decay), context)
    tx = optax.multi_transform(
        {"context": context,
         "params": optax.adamw(lrs["params"], weight_decay=config.qat.weight_decay),
         "scales": optax.adam(lrs["scales"])},
        {"context": "context", "params": "params", "scales": "scales"})
    return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), tx) if tcfg.clip_norm else tx


def make_train_step(*, model, prompts, tx, weights, mesh, state_shardings, fixed_shardings,
                    teacher_adapter=None):
    """A jitted (state, fixed, batch) -> (state, metrics): the state laid out by
    `state_shardings` (and donated), `fixed` by `fixed_shardings`, the batch over `data`."""

    def step(state, fixed, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.trainable, fixed, batch, model=model,
                                      prompts=prompts, weights=weights,
                                      teacher_adapter=teacher_adapter)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        trainable["scales"] = lsq.keep_positive(trainable["scales"], fixed.quant.scales())
        return step_lib.TrainState(step=state.step + 1, trainable=trainable,
                                   opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_shardings, fixed_shardings,
                                       parallel.batch_sharding(mesh)),
                   out_shardings=(state_shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,))


def num_params(tree):
    """The number of entries of a tree's arrays."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Result:
    trained: classifier_lib.Trained  # the learned prompts (no adapter)
    params: dict  # the trained CLIP params
    quant: lsq.LSQState  # the learned steps, as the train step applies them
    qstate: object  # the learned steps and the kernels they quantize (`lsq.to_qstate`)
    history: list
    trainable_params: int


@dataclasses.dataclass
class Setup:
    """Everything one QAT run steps through (`setup`)."""

    state: step_lib.TrainState  # placed by `state_shardings`
    fixed: Fixed  # placed by `fixed_shardings`
    train_step: object
    lrs: dict
    total_steps: int


def setup(config, *, model, params, qstate, teacher, class_names, mesh):
    """The QAT run's prompts, initial state, fixed inputs, optimizer and jitted step."""
    tcfg = config.train
    parallel.check_batch_size(tcfg.batch_size, mesh, name="train.batch_size")
    if tcfg.schedule != "cosine":
        raise ValueError(f"train.schedule={tcfg.schedule!r}: QAT follows P4Q's 'cosine' "
                         "schedule only")
    model = model.clone(text_remat=config.speed.remat)
    key_context, _ = jax.random.split(jax.random.key(config.seed))  # P4Q's draw
    context = train_lib.initial_context(config, model, params, len(class_names), key_context)
    prompts = prompts_lib.build(class_names, n_ctx=context.shape[-2],
                                position=config.p4q.position,
                                context_length=model.config.text.context_length,
                                crop=config.speed.crop_text)
    steps_per_epoch = max(1, data.num_examples(config.data, split="train") // tcfg.batch_size)
    total_steps = tcfg.num_steps or train_lib.epochs(config) * steps_per_epoch
    lrs = schedules(config, total_steps)
    tx = optimizer(config, lrs)
    fixed = make_fixed(params, qstate, prompts, teacher)
    min_size = config.mesh.shard_min_size
    fixed_shardings = parallel.weight_shardings(fixed, mesh, min_size=min_size)
    state = step_lib.init_state(initial_trainable(params, fixed, context), tx)
    state_shardings = parallel.weight_shardings(state, mesh, min_size=min_size)
    train_step = make_train_step(
        model=model, prompts=prompts, tx=tx, weights=step_lib.loss_weights(config.loss),
        mesh=mesh, state_shardings=state_shardings, fixed_shardings=fixed_shardings,
        teacher_adapter=teacher.adapter)
    return Setup(state=jax.device_put(state, state_shardings),
                 fixed=jax.device_put(fixed, fixed_shardings), train_step=train_step, lrs=lrs,
                 total_steps=total_steps)


def train(config, *, model, params, qstate, teacher, class_names, mesh, workdir, phases=None):
    """Trains the QAT baseline (see the module docstring) from the calibrated `qstate` ->
    Result. Resumes from WORKDIR/checkpoints like P4Q (`train.loop`)."""
    phases = phases or phases_lib.Phases()
    run = setup(config, model=model, params=params, qstate=qstate, teacher=teacher,
                class_names=class_names, mesh=mesh)
    phases.start("training")
    state, history = train_lib.loop(
        config, state=run.state, train_step=run.train_step, frozen=run.fixed, source=None,
        lrs=run.lrs, total_steps=run.total_steps, mesh=mesh, workdir=workdir,
        image_size=model.config.vision.image_size, desc="QAT train")
    trainable = jax.device_get(state.trainable)
    params, quant = model_state(trainable, jax.device_get(run.fixed))
    trained = classifier_lib.Trained(
        class_names=tuple(class_names), position=config.p4q.position,
        context=jnp.asarray(trainable["context"]), adapter=None, adapter_params=None,
        adapter_qstate=None)
    return Result(trained=trained, params=params, quant=quant,
                  qstate=lsq.to_qstate(quant, params),
                  history=history, trainable_params=num_params(trainable))
