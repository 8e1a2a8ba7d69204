"""P4Q's training loop: prompts + QAdapter on a frozen (quantized) CLIP, resumable.

`train` builds the prompt layout, the frozen inputs of the step (FP params, quant state,
teacher text features), the trainable tree and the optimizers from the config, then runs
the jitted step over the training input:

* with `speed.feature_cache` (default) and `data.augment="flip"`, batches of cached
  student/teacher image features (`p4q.features`), read back from `speed.cache_dir` on a
  restart;
* otherwise (e.g. CoOp's random crops, `data.augment="coop"`), batches of images from the
  tf.data pipeline (both image towers then run in every step; a restart skips the batches
  already seen without decoding them).

Either way the batch of step n is fixed by (seed, n), and `checkpoint.Checkpointer` saves
the train state with the input position, so a killed run resumes where it stopped and
ends with the parameters of an uninterrupted one. A checkpoint of a run with another
config is never resumed (`checkpoint.fingerprint`); `checkpoint.restart` moves it aside.
Loss terms and learning rates go to CLU metric writers (TensorBoard + log) and a progress
bar with ETA. That loop is `loop`, which takes any jitted step and state (QAT's, `qat.py`).

After the last step the adapter's 8-bit input ranges are calibrated (OMSE) on
`p4q.adapter_calib_batches` training batches of student features with the final
weights, and frozen for evaluation (see `p4q/adapter.py`).
"""

import dataclasses
import itertools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from p4q_jax import checkpoint as checkpoint_lib
from p4q_jax import clip
from p4q_jax import data
from p4q_jax import parallel
from p4q_jax import phases as phases_lib
from p4q_jax import results as results_lib
from p4q_jax.clip import tokenizer as tokenizer_lib
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import features as features_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib
from p4q_jax.p4q import classifier as classifier_lib
from p4q_jax.quant import calibration


def epochs(config):
    """Training epochs: `train.epochs`, or CoOp's for the shots (`train.epochs_from_shots`)."""
    if not config.train.epochs_from_shots:
        return config.train.epochs
    if config.data.name == "coop/imagenet":
        return step_lib.COOP_IMAGENET_EPOCHS
    if config.data.num_shots not in step_lib.COOP_EPOCHS:
        raise ValueError(f"train.epochs_from_shots needs data.num_shots in "
                         f"{sorted(step_lib.COOP_EPOCHS)}, got {config.data.num_shots}.")
    return step_lib.COOP_EPOCHS[config.data.num_shots]


def prompt_lr(cfg):
    """The official prompt learning rate, 5e-4 x batch / 20, unless set."""
    return cfg.prompt_lr if cfg.prompt_lr is not None else 5e-4 * cfg.batch_size / 20


def initial_context(config, model, params, num_classes, key):
    """The prompts' initial context (`p4q.ctx_init`, `n_ctx`, `class_specific`), float32."""
    cfg = config.p4q
    if cfg.ctx_init:
        context = clip.encode.apply(
            model, params, jnp.asarray([tokenizer_lib.Tokenizer().encode(cfg.ctx_init)]),
            method=model.embed_tokens)[0]
        if not context.shape[0]:
            raise ValueError(f"p4q.ctx_init={cfg.ctx_init!r} has no tokens")
    else:
        context = prompts_lib.init_context(key, n_ctx=cfg.n_ctx, width=model.config.text.width)
    if cfg.class_specific:
        context = jnp.broadcast_to(context, (num_classes, *context.shape))
    return jnp.asarray(context, jnp.float32)


class _PipelineInput:
    """Image batches from tf.data (no feature cache); step n is the pipeline's n-th. A resumed
    run starts at step `start` without decoding the batches before it."""

    def __init__(self, config, image_size, start):
        ds = data.create_dataset(config.data, split="train", batch_size=config.train.batch_size,
                                 image_size=image_size, train=True, seed=config.seed,
                                 skip_batches=start)
        self._iter = iter(data.as_numpy_batches(ds))
        self._next = start

    def batch(self, step):
        if step != self._next:
            raise ValueError(f"the pipeline input is sequential: expected step {self._next}, "
                             f"got {step}")
        self._next += 1
        batch = next(self._iter)
        return {"image": batch["image"], "label": batch["label"]}


@dataclasses.dataclass
class Result:
    trained: classifier_lib.Trained
    history: list  # [{"step": n, metric: mean since the previous entry, ...}]


def train(config, *, model, params, qstate, teacher, class_names, mesh, workdir,
          source=None, phases=None):
    """Trains P4Q (or a baseline/ablation, as configured) -> Result: `_set_up` builds the
    step and its inputs, `loop` runs it (resuming from the run's latest checkpoint) and
    `_finish` calibrates the adapter's 8-bit input ranges on the final weights.

    Args:
      config: the experiment ConfigDict (sections p4q, train, loss, speed, checkpoint, data).
      model, params: the CLIP and its FP params (on `mesh`: `parallel.place_weights`).
      qstate: the calibrated QState of both towers, or None to train on the FP model.
      teacher: the distillation teacher (`p4q.teacher`: the FP zero-shot classifier or a
        trained FP export).
      class_names: the C class names, in label order.
      mesh: the device mesh; the global batch is split over its `data` axis.
      workdir: checkpoints, the feature cache and the metric logs go here.
      source: the `features.cached_input`, if the caller built it (then `params` need only
        hold what the student's text tower and the prompts read, e.g. the quantized params
        `qstate.quantized_params(params)`); default: built here when the config uses one.
      phases: a `phases.Phases` that times the feature cache, the training and the
        adapter's calibration (default: a new one, not returned).
    """
    phases = phases or phases_lib.Phases()
    run = _set_up(config, model=model, params=params, qstate=qstate, teacher=teacher,
                  class_names=class_names, mesh=mesh, workdir=workdir, source=source,
                  phases=phases)
    phases.start("training")
    state, history = loop(config, state=run.state, train_step=run.train_step, frozen=run.frozen,
                          source=run.source, lrs=run.lrs, total_steps=run.total_steps,
                          mesh=mesh, workdir=workdir,
                          image_size=run.model.config.vision.image_size)
    trained = _finish(config, run, state, qstate=qstate, class_names=class_names, mesh=mesh,
                      phases=phases)
    return Result(trained=trained, history=history)


@dataclasses.dataclass
class _Run:
    """What `_set_up` builds for `loop` and `_finish`."""
    model: Any  # the CLIP, with the configured text-tower remat
    frozen: step_lib.Frozen  # the step's frozen inputs, placed on the mesh
    adapter: Any  # the QAdapter, or None without one
    source: Any  # the `features.CachedInput`, or None: the tf.data pipeline
    state: Any  # the initial train state, replicated
    train_step: Any  # the jitted (state, frozen, batch) -> (state, metrics)
    lrs: dict  # {name: schedule} of the learning rates, for the logs
    total_steps: int


def _set_up(config, *, model, params, qstate, teacher, class_names, mesh, workdir, source,
            phases):
    """The prompt layout, the frozen inputs, the trainable tree, the training input (the
    feature cache, built here unless `source` is given), the schedules and optimizers, and
    the jitted step -> a `_Run`."""
    cfg, tcfg = config.p4q, config.train
    parallel.check_batch_size(tcfg.batch_size, mesh, name="train.batch_size")
    model = model.clone(text_remat=config.speed.remat)
    key_context, key_adapter = jax.random.split(jax.random.key(config.seed))
    context = initial_context(config, model, params, len(class_names), key_context)
    prompts = prompts_lib.build(class_names, n_ctx=context.shape[-2], position=cfg.position,
                                context_length=model.config.text.context_length,
                                crop=config.speed.crop_text)
    frozen = step_lib.make_frozen(model, params, qstate, prompts, teacher.text,
                                  image_towers=not features_lib.uses_cache(config), train=True,
                                  teacher_adapter=teacher.adapter_state)
    frozen_shardings = parallel.weight_shardings(frozen, mesh,
                                                 min_size=config.mesh.shard_min_size)
    frozen = jax.device_put(frozen, frozen_shardings)
    adapter = adapter_params = None
    if cfg.adapter:
        adapter = adapter_lib.QAdapter(reduction=cfg.adapter_reduction, ratio=cfg.adapter_ratio)
        adapter_params = adapter.init(key_adapter, jnp.zeros((1, model.config.embed_dim)))["params"]

    if features_lib.uses_cache(config):
        if source is None:
            phases.start("feature cache")
            source = features_lib.cached_input(config, model=model, params=params,
                                               qstate=qstate, mesh=mesh, workdir=workdir)
        steps_per_epoch = source.steps_per_epoch
    else:
        # A set smaller than the batch still gets a step per epoch (Dassl: one short batch;
        # here a full one, some images twice in other random views).
        num_examples = data.num_examples(config.data, split="train")
        source, steps_per_epoch = None, max(1, num_examples // tcfg.batch_size)
    num_epochs = epochs(config)
    total_steps = tcfg.num_steps or num_epochs * steps_per_epoch
    if total_steps < 1:
        raise ValueError(f"no training steps: train.num_steps={tcfg.num_steps}, "
                         f"{num_epochs} epochs of {steps_per_epoch} steps")

    lrs, reset_steps = _learning_rates(tcfg, steps_per_epoch=steps_per_epoch,
                                       num_epochs=num_epochs, total_steps=total_steps)
    tx = step_lib.optimizer(lrs, adapter_eps=tcfg.adapter_eps,
                            adapter_weight_decay=tcfg.adapter_weight_decay,
                            clip_norm=tcfg.clip_norm, train_prompts=cfg.train_prompts,
                            prompt_momentum=tcfg.prompt_momentum,
                            prompt_weight_decay=tcfg.prompt_weight_decay,
                            reset_steps=reset_steps)
    state = parallel.replicate(step_lib.init_state(
        {"context": context, "adapter": adapter_params}, tx), mesh)
    train_step = step_lib.make_train_step(
        model=model, prompts=prompts, adapter=adapter, tx=tx, mesh=mesh,
        weights=step_lib.loss_weights(config.loss), teacher_adapter=teacher.adapter,
        shared_prefix=config.speed.shared_prefix, train_prompts=cfg.train_prompts,
        frozen_shardings=frozen_shardings,
        length_buckets=config.speed.length_buckets if config.speed.crop_text else 1,
        schedule=step_lib.xla_schedule(config.speed.xla_schedule,
                                       num_classes=len(class_names),
                                       remat=config.speed.remat))
    return _Run(model=model, frozen=frozen, adapter=adapter, source=source, state=state,
                train_step=train_step, lrs=lrs, total_steps=total_steps)


def _learning_rates(tcfg, *, steps_per_epoch, num_epochs, total_steps):
    """`train.schedule`'s learning rates -> ({name: schedule}, the steps at which the
    optimizers restart: the stage boundaries of "official_stages", else none)."""
    if tcfg.schedule == "coop":
        return step_lib.epoch_cosine_schedules(
            prompt_lr=prompt_lr(tcfg), adapter_lr=tcfg.adapter_lr,
            steps_per_epoch=steps_per_epoch, epochs=num_epochs,
            warmup_epochs=tcfg.warmup_epochs, warmup_lr=tcfg.warmup_lr), ()
    if tcfg.schedule == "official_stages":
        ends = step_lib.stage_ends(tcfg.stage_epochs, steps_per_epoch=steps_per_epoch,
                                   total_steps=total_steps)
        return step_lib.official_stage_schedules(
            prompt_lr=prompt_lr(tcfg), adapter_lr=tcfg.adapter_lr, stage_ends=ends,
            final_fraction=tcfg.prompt_final_fraction), ends[:-1]  # each stage: new optimizers
    return step_lib.schedules(prompt_lr=prompt_lr(tcfg), adapter_lr=tcfg.adapter_lr,
                              total_steps=total_steps, final_fraction=tcfg.prompt_final_fraction,
                              warmup_steps=tcfg.warmup_steps), ()


def loop(config, *, state, train_step, frozen, source, lrs, total_steps, mesh, workdir,
         image_size, desc="P4Q train"):
    """Runs `train_step` (state, frozen, batch) -> (state, metrics) from this run's latest
    checkpoint (else from `state`) to `total_steps` -> (state, history).

    `source`: the training input (`.batch(step)`), or None for image batches from the
    pipeline (`_PipelineInput`, at `image_size`). `lrs`: {name: schedule}, logged as
    `lr_<name>`. Checkpoints hold the state and the input position; a killed run resumes
    where it stopped and ends with the state of an uninterrupted one.
    """
    if config.checkpoint.restart:
        checkpoint_lib.move_run_aside(workdir)
    checkpointer = checkpoint_lib.Checkpointer(
        pathlib.Path(workdir).absolute() / "checkpoints", every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
        fingerprint=checkpoint_lib.run_fingerprint(config))
    try:  # closed on every path: an open manager's background loops outlive the run
        restored, meta = checkpointer.restore_latest(state)
        history = []
        if restored is not None:
            if meta["total_steps"] != total_steps:  # same config, but the data changed size
                raise checkpoint_lib.RunMismatchError(
                    f"the checkpoint in {workdir} is of a {meta['total_steps']}-step run; this "
                    f"config and data give {total_steps} steps. Use another --workdir, or "
                    "--config.checkpoint.restart=True to move the old run aside.")
            state, history = restored, meta["history"]
        start = int(state.step)
        if source is None:
            source = _PipelineInput(config, image_size, start)

        writer = results_lib.metric_writer(workdir)
        pending = []
        progress = tqdm.tqdm(range(start, total_steps), initial=start, total=total_steps,
                             desc=desc, unit="step", disable=jax.process_index() != 0)
        for step in progress:
            state, metrics = train_step(state, frozen, parallel.to_global(source.batch(step), mesh))
            if pending:
                # At most two steps in flight: a deep queue of steps whose collectives wait on
                # each other can starve XLA:CPU's rendezvous on hosts with few cores.
                jax.block_until_ready(pending[-1])
            pending.append(metrics)
            done = step + 1
            if done % config.train.log_every == 0 or done == total_steps:
                means = jax.tree.map(lambda *m: float(np.mean(m)), *jax.device_get(pending))
                pending = []
                means.update({f"lr_{name}": float(s(step)) for name, s in lrs.items()})
                writer.write_scalars(done, means)
                history.append({"step": done, **means})
                progress.set_postfix(loss=f"{means['loss']:.4f}")
            checkpointer.save(done, state, {"input_position": done, "total_steps": total_steps,
                                            "history": list(history)},
                              force=done == total_steps)
        checkpointer.wait()
    finally:
        checkpointer.close()
    writer.flush()
    return state, history


def _finish(config, run, state, *, qstate, class_names, mesh, phases):
    """The trained prompts and adapter of the final `state`, the adapter's 8-bit input
    ranges calibrated on `p4q.adapter_calib_batches` training batches -> `Trained`."""
    cfg = config.p4q
    trainable = jax.device_get(state.trainable)
    adapter_qstate = None
    if run.adapter is not None:
        phases.start("adapter calibration")
        adapter_qstate = adapter_lib.calibrate(
            run.adapter, trainable["adapter"],
            _calibration_features(config, run.model, run.frozen, mesh,
                                  run.model.config.vision.image_size, run.source,
                                  cfg.adapter_calib_batches),
            search_rows=_adapter_search_rows(config, qstate))
    return classifier_lib.Trained(
        class_names=tuple(class_names), position=cfg.position,
        context=jnp.asarray(trainable["context"]), adapter=run.adapter,
        adapter_params=trainable["adapter"], adapter_qstate=adapter_qstate)


def _adapter_search_rows(config, qstate):
    """`config.quant.search_rows` resolved for the towers' preset ("auto": "last" for the
    public code's `official`), which the adapter's calibration follows."""
    search_rows = config.quant.search_rows
    if qstate is None:
        return "balanced" if search_rows == "auto" else search_rows
    return calibration.resolve_search_rows(search_rows, qstate.config)


def _calibration_features(config, model, frozen, mesh, image_size, source, num_batches):
    """Student image features of the first `num_batches` training batches (global arrays)."""
    if isinstance(source, features_lib.CachedInput):
        return [parallel.to_global(source.batch(i)["student"], mesh) for i in range(num_batches)]
    encode = jax.jit(lambda p, q, x: step_lib.paired_image_features(model, p, q, x)["student"])
    ds = data.create_dataset(config.data, split="train", batch_size=config.train.batch_size,
                             image_size=image_size, train=True, seed=config.seed)
    return [encode(frozen.params, frozen.qstate, parallel.to_global(b["image"], mesh))
            for b in itertools.islice(data.as_numpy_batches(ds), num_batches)]
