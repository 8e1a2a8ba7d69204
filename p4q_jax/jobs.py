"""The jobs that `main.py` runs, one function per mode, each `(config, workdir) -> results`."""

import itertools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from p4q_jax import atomic
from p4q_jax import checkpoint as checkpoint_lib
from p4q_jax import clip
from p4q_jax import costs
from p4q_jax import data
from p4q_jax import evaluate
from p4q_jax import parallel
from p4q_jax import phases as phases_lib
from p4q_jax import preflight
from p4q_jax import qat as qat_lib
from p4q_jax import quant
from p4q_jax import results
from p4q_jax import runlock
from p4q_jax import tables
from p4q_jax import train
from p4q_jax.clip import storage
from p4q_jax.p4q import features
from p4q_jax.p4q import losses
from p4q_jax.p4q import teacher as teacher_lib
from p4q_jax.p4q import classifier as classifier_lib
from p4q_jax.p4q import variants
from p4q_jax.quant import calibration
from p4q_jax.quant import integer
from p4q_jax.quant import sites


def initialize_distributed(config):
    """Joins a multi-host run when the config asks for it (before any JAX computation). CPU
    processes exchange their collectives over gloo (JAX's default today, set so it stays)."""
    cfg = config.distributed
    if cfg.auto or cfg.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.auto:
        jax.distributed.initialize()
    elif cfg.coordinator_address:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id)


def build_model(config):
    """(model, params, is_smoke_run) from `config.model`: a checkpoint, or a random init;
    with `quant.fold_batchnorm`, a ResNet's BatchNorms folded into its convs (every row of the
    run, FP ones included, then uses the folded model: the same function up to rounding)."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.checkpoint:
        model, params = clip.load(config.model.checkpoint, dtype=dtype,
                                  activation=config.model.activation)
        smoke = False
    else:
        logging.warning(
            "SMOKE RUN: no --config.model.checkpoint given, so a randomly initialised %r CLIP "
            "is used. It exercises the whole pipeline; its accuracy is chance level.",
            config.model.name)
        model, params = clip.init(config.model.name, seed=config.seed, dtype=dtype)
        smoke = True
    if config.quant.fold_batchnorm:
        params = quant.fold_batchnorm(params)
    return model, params, smoke


class _Job:
    """What every mode sets up: mesh, model, dataset info, and a sharded evaluator."""

    def __init__(self, config, *, model_and_params=None, phases=None):
        self.config = config
        if phases is None:
            phases = phases_lib.Phases()
            phases.start("set-up")
        self.phases = phases  # process-wide: a job's own phases, or those of its caller
        self.mesh = parallel.make_mesh(data=config.mesh.data, model=config.mesh.model)
        parallel.check_batch_size(config.eval.batch_size, self.mesh, name="eval.batch_size")
        if model_and_params is None:
            self.model, params, self.smoke = build_model(config)
        else:
            (self.model, params), self.smoke = model_and_params, False
        self.weights = classifier_lib.weights_fingerprint(params)  # the base model's identity
        self.params = self.place(params)  # on the devices once, large kernels split over `model`
        on_device, total = parallel.bytes_per_device(self.params)
        logging.info("frozen params: %.1f of %.1f MB on each device (mesh %s)", on_device / 2**20,
                     total / 2**20, dict(self.mesh.shape))
        self.info = data.info_from_config(config.data)
        self.prompts = data.prompts(self.info.class_names, self.info.templates)
        self.image_size = self.model.config.vision.image_size
        self._step = evaluate.make_eval_step(evaluate.image_tower(self.model), mesh=self.mesh,
                                             num_classes=len(self.info.class_names))

    def place(self, tree):
        """Frozen arrays -> placed on the mesh (`parallel.place_weights`)."""
        return parallel.place_weights(tree, self.mesh, min_size=self.config.mesh.shard_min_size)

    def inference(self, qstate):
        """The state quantized inference runs on (`quant.integer`), placed on the mesh."""
        return self.place(
            integer.inference_state(qstate, self.params, self.config.quant.integer))

    def variables(self, qstate=None):
        return {"params": self.params, "qstate": self.inference(qstate)}

    def classifier(self, variables):
        return evaluate.zeroshot_classifier(self.model, variables, self.prompts, mesh=self.mesh,
                                            batch_size=self.config.eval.text_batch_size)

    def accuracy(self, variables, classifier, *, desc, step=None, split="test"):
        """Top-1/top-5 on `split` (eval transforms: center crop, no flip)."""
        cfg = self.config
        dataset = data.create_dataset(cfg.data, split=split, batch_size=cfg.eval.batch_size,
                                      image_size=self.image_size, train=False)
        return evaluate.accuracy(
            step or self._step, variables, classifier, data.as_numpy_batches(dataset),
            mesh=self.mesh,
            total=data.num_eval_batches(cfg.data, split=split, batch_size=cfg.eval.batch_size),
            desc=desc)

    def data_origin(self):
        """The training data of this job's runs, as exports record it (`p4q.teacher`)."""
        cfg = self.config.data
        return {"dataset": cfg.name, "split": self.info.split_name("train"),
                "test_split": self.info.split_name("test"), "num_shots": cfg.num_shots,
                "shot_seed": cfg.shot_seed, "subsample": cfg.subsample}

    def results(self, mode, rows, **extra):
        return {
            "mode": mode,
            "smoke_run": self.smoke,
            "checkpoint": self.config.model.checkpoint,
            "model": self.model.config.to_dict(),
            "dataset": self.config.data.name,
            "eval_split": self.info.split_name("test"),  # the rows' images
            "num_classes": len(self.info.class_names),
            "num_templates": len(self.info.templates),
            "rows": rows,
            **extra,
        }

    def finish(self, workdir, out):
        self.phases.stop()
        out["phases"] = self.phases.records
        out["fingerprint"] = checkpoint_lib.run_fingerprint(self.config, out["mode"])
        path = results.file_for(workdir, out["mode"])
        results.write_json(path, out)
        for row in out["rows"]:
            logging.info("%s %s: top-1 %.2f top-5 %.2f (%d images)", row["method"],
                         self.config.data.name, row["top1"], row["top5"], row["count"])
        if jax.process_index() == 0:  # the process that writes them
            logging.info("results -> %s%s", path, " [SMOKE RUN: random weights, the accuracy "
                         "is meaningless]" if self.smoke else "")
        return out


def zeroshot(config, workdir):
    """Zero-shot top-1/top-5 of a CLIP on the dataset's test split -> results.json."""
    job = _Job(config)
    job.phases.start("zero-shot evaluation")
    variables = job.variables()
    metrics = job.accuracy(variables, job.classifier(variables), desc="zero-shot")
    return job.finish(workdir, job.results("zeroshot", [{"method": "fp_zeroshot", **metrics,
                                                         **_fp_costs(config)}]))


def _fp_costs(config):
    """The FP zero-shot row's cost columns: nothing trained or calibrated, the FP
    checkpoint's bytes on disk (None for a random init)."""
    checkpoint = config.model.checkpoint
    return costs.fields(bytes_on_disk=storage.bytes_on_disk(checkpoint) if checkpoint else None)


def calibration_images(job, qconfig):
    """The first `quant.calib_batches` x `quant.calib_batch_size` images of the training
    stream, for the image tower: (a generator of global arrays, decoded as they are read,
    the number of images).

    With the balanced search, whose scales do not depend on how the images are cut into
    batches, they come in passes of `eval.batch_size` where that divides the calibration
    batch (the same images in the same order, a fraction of the activations in memory);
    the public code's rule ("last") scores the final calibration batch, so it keeps them. On
    CPU devices the pipeline decodes only when a batch is read (`data.in_the_foreground`); an
    accelerator computes while the host decodes ahead."""
    cfg = job.config
    size, count = cfg.quant.calib_batch_size, cfg.quant.calib_batches
    if (calibration.resolve_search_rows(cfg.quant.search_rows, qconfig) == "balanced"
            and size % cfg.eval.batch_size == 0):
        size, count = cfg.eval.batch_size, count * (size // cfg.eval.batch_size)
    dataset = data.create_dataset(cfg.data, split="train", batch_size=size,
                                  image_size=job.image_size, train=True, seed=cfg.seed)
    if jax.devices()[0].platform == "cpu":  # decoding ahead would take XLA's cores
        dataset = data.in_the_foreground(dataset)
    batches = itertools.islice(data.as_numpy_batches(dataset), count)
    return (parallel.to_global(b["image"], job.mesh) for b in batches), size * count


def _fp_and_ptq(job, *, quantize=True):
    """(QState or None, FP teacher class features, [FP zero-shot row, PTQ row]).

    Calibration also yields the FP text features of the prompt ensemble, so the FP
    classifier costs no second text pass."""
    fp = job.variables()
    if not quantize:
        job.phases.start("zero-shot evaluation")
        teacher = job.classifier(fp)
        return None, teacher, [{"method": "fp_zeroshot",
                                **job.accuracy(fp, teacher, desc="FP zero-shot"),
                                **_fp_costs(job.config)}]
    texts = [t for class_prompts in job.prompts for t in class_prompts]
    qconfig = quant.QConfig.parse(job.config.quant.config)
    job.phases.start("calibration")
    start = time.perf_counter()
    images, num_images = calibration_images(job, qconfig)
    qstate, fp_text, report = quant.calibrate(
        job.model, job.params, qconfig, images=images, num_images=num_images, texts=texts,
        text_batch_size=job.config.eval.text_batch_size, return_text_features=True,
        search_rows=job.config.quant.search_rows, return_report=True)
    seconds = time.perf_counter() - start
    teacher = evaluate.ensemble(fp_text, num_classes=len(job.prompts))
    job.phases.start("zero-shot and PTQ evaluation")
    q = job.variables(qstate)
    return qstate, teacher, [
        {"method": "fp_zeroshot", **job.accuracy(fp, teacher, desc="FP zero-shot"),
         **_fp_costs(job.config)},
        {"method": "ptq", "qconfig": qconfig.name,
         **job.accuracy(q, job.classifier(q), desc=f"PTQ {qconfig.name}"),
         "diagnostics": report.to_dict(), **costs.fields(calibration_seconds=seconds)}]


def ptq(config, workdir):
    """Calibrate -> zero-shot FP and PTQ (and with `quant.compensation="qwt"`, QwT) on the
    test split -> results.json."""
    job = _Job(config)
    qstate, _, rows = _fp_and_ptq(job)
    if config.quant.compensation == "qwt":
        rows.append(_qwt(job, qstate, rows[1])[1])
    return job.finish(workdir, job.results("ptq", rows, qconfig=qstate.config.name))


def _qwt(job, qstate, ptq_row):
    """QwT's compensation of `qstate`, solved on the calibration images (read again) and
    the prompt ensemble -> (the compensated QState, its results row: the solve's wall
    seconds, and the PTQ calibration's plus them as its calibration seconds).

    Needs the job's FP params (before a p4q job swaps in the quantized kernels)."""
    job.phases.start("QwT compensation")
    images, _ = calibration_images(job, qstate.config)
    texts = [t for class_prompts in job.prompts for t in class_prompts]
    start = time.perf_counter()
    qwt = quant.compensate(job.model, job.params, qstate, images=list(images), texts=texts,
                           text_batch_size=job.config.eval.text_batch_size)
    seconds = time.perf_counter() - start
    job.phases.start("QwT evaluation")
    q = job.variables(qwt)
    return qwt, {"method": "qwt", "qconfig": qstate.config.name, "compensation_seconds": seconds,
                 **job.accuracy(q, job.classifier(q), desc=f"QwT {qstate.config.name}"),
                 **costs.fields(compensation=costs.compensation_count(qwt),
                                calibration_seconds=ptq_row["calibration_seconds"] + seconds)}


def _trained_accuracy(job, trained, variables, *, desc):
    """Top-1/top-5 of a trained P4Q (prompts + adapter) on the test split."""
    variables = job.place(variables)  # the learned context and adapter: replicated
    class_features = jax.jit(lambda v: trained.class_features(job.model, v))(variables)
    step = evaluate.make_eval_step(lambda v, x: trained.image_features(job.model, v, x),
                                   mesh=job.mesh, num_classes=len(job.info.class_names))
    return job.accuracy(variables, class_features, desc=desc, step=step)


def harmonic_mean(a, b):
    """CoCoOp's H of base and new top-1 (0 when both are 0)."""
    return 2 * a * b / (a + b) if a + b else 0.0


def _new_classes_job(config, job):
    """The job of CoCoOp's new half of the classes (its class names and test images), on
    the model and params `job` holds now."""
    new_config = config.copy_and_resolve_references()
    new_config.data.subsample = "new"
    return _Job(new_config, model_and_params=(job.model, job.params), phases=job.phases)


def _baselines_on_new(config, job, qstate, compensated=None):
    """FP zero-shot, PTQ (and QwT, given its `compensated` QState) top-1/top-5 on the new
    half: {method: metrics}."""
    new = _new_classes_job(config, job)
    fp = new.variables()
    measured = {"fp_zeroshot": new.accuracy(fp, new.classifier(fp), desc="FP zero-shot, new")}
    for method, state in (("ptq", qstate), ("qwt", compensated)):
        if state is not None:
            q = new.variables(state)
            measured[method] = new.accuracy(q, new.classifier(q), desc=f"{method}, new")
    return measured


def _with_new_classes(config, job, rows, qstate, trained, measured):
    """CoCoOp's base-to-new: every row of a run trained on the base half of the classes is
    also measured on the new half (`measured`: the baselines', from `_baselines_on_new`;
    the trained model's with the learned context in front of the new names), with the
    harmonic mean of the two top-1s."""
    new = _new_classes_job(config, job)
    moved = trained.for_classes(new.info.class_names)
    measured = {**measured, config.p4q.method: _trained_accuracy(
        new, moved, moved.variables(new.params, new.inference(qstate)),
        desc=f"{config.p4q.method}, new")}
    return [{**row, "new": measured[row["method"]],
             "hm": harmonic_mean(row["top1"], measured[row["method"]]["top1"])} for row in rows]


def _calibration_key(config):
    """What `_fp_and_ptq` depends on: runs that agree on it share its results (the demo).
    QwT's compensation comes after it (`_qwt`), so runs with and without one share it."""
    key = {"seed": config.seed, "quantize": config.p4q.quantize,
           **{section: config[section].to_dict()
              for section in ("model", "data", "quant", "eval")}}
    key["quant"].pop("compensation", None)
    return repr(key)


def _teacher(config, job, zeroshot_text, rows):
    """The run's distillation teacher (`loss.teacher`) and its top-1 on the test split."""
    if config.loss.teacher == teacher_lib.ZEROSHOT:
        return teacher_lib.zeroshot(zeroshot_text), rows[0]["top1"]
    job.phases.start("teacher")
    teacher = teacher_lib.from_export(
        config.loss.teacher, model=job.model, params=job.params,
        class_names=job.info.class_names, data_origin=job.data_origin(), weights=job.weights)
    test = _trained_accuracy(job, teacher.trained,
                             teacher.trained.variables(job.params, None), desc="teacher")
    return teacher, test["top1"]


def _teacher_train_top1(job, teacher, source, *, rows=8192):
    """The teacher's top-1 on the training split: from the feature cache's FP features
    (view 0, the image as given; `rows` at a time) where there is one, else a pass with eval
    transforms."""
    if source is not None:
        features, labels = source.cache["teacher"], np.asarray(source.cache["label"])
        correct = 0
        for start in range(0, len(labels), rows):
            chunk = jnp.asarray(np.asarray(features[start:start + rows, 0]))
            logits = losses.cosine_logits(teacher.adapt_image_features(chunk), teacher.text, 1.0)
            correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) ==
                                  labels[start:start + rows]))
        return 100.0 * correct / len(labels)
    step = evaluate.make_eval_step(
        lambda v, x: teacher.adapt_image_features(clip.encode.apply(
            job.model, v["params"], x, method=job.model.encode_image)),
        mesh=job.mesh, num_classes=len(job.info.class_names))
    return job.accuracy({"params": job.params}, teacher.text, desc="teacher, train split",
                        step=step, split="train")["top1"]


def recipe(config, teacher=None):
    """How a training row was trained: which parts learn, the distillation and its teacher."""
    cfg, loss = config.p4q, config.loss
    distills = loss.distillation_kind != "none" and loss.distillation > 0
    return {"prompts": "learned" if cfg.train_prompts else f"fixed ({cfg.ctx_init!r})",
            "adapter": bool(cfg.adapter), "quantized": bool(cfg.quantize),
            "distillation": loss.distillation_kind if distills else "none",
            "distillation_weight": loss.distillation if distills else 0.0,
            "temperature": loss.temperature if loss.distillation_kind == "kl" else None,
            "teacher": teacher if distills else None}


def _calibrated(config, job, shared):
    """`_fp_and_ptq`'s (QState placed on the mesh, FP zero-shot text features, rows), or those
    of an earlier run with the same `_calibration_key` in `shared` (when given)."""
    key = _calibration_key(config)
    if shared is not None and key in shared:
        logging.info("calibration, FP zero-shot and PTQ: reused from an earlier run")
        qstate, zeroshot_text, rows = shared[key]
        rows = [dict(row) for row in rows]
    else:
        qstate, zeroshot_text, rows = _fp_and_ptq(job, quantize=config.p4q.quantize)
        if shared is not None:
            shared[key] = (qstate, zeroshot_text, [dict(row) for row in rows])
    return job.place(qstate), zeroshot_text, rows


def p4q(config, workdir, *, shared=None):
    """Calibrate -> zero-shot FP and PTQ -> train P4Q -> evaluate -> export, results.json,
    training curves, and the exact training images in train_split.json. With
    `p4q.quantize=False` the FP model is trained (CoOp-FP, or FP P4Q with the adapter).
    Trained on the base half of a CoOp dataset's classes (`data.subsample="base"`), each row
    also holds its accuracy on the new half ("new") and the harmonic mean ("hm"). The
    trained row says how it was trained (`recipe`: parts, distillation, and the teacher with
    its own top-1 on the train and test splits).

    With `quant.compensation="qwt"` (the `qwt_p4q` variant), QwT's compensation of the
    calibrated model is solved first (a "qwt" row) and P4Q trains, is evaluated and exported
    on the compensated model (`QState.compensation`, stored in the export's towers).

    `shared`: a dict that runs of one process pass along (the demo) to reuse the calibration,
    FP zero-shot and PTQ results (and QwT's) of a run with the same model, data and
    quantization.

    Every row carries the cost columns (`costs.FIELDS`).

    Lean: every FP measurement comes first; the text tower's FP kernels of quantized layers
    go before the feature cache is built (it reads the image towers only), the image
    tower's once the cache holds the FP teacher's features (the job's params become
    `qstate.quantized_params`), so training, evaluation and export hold each kernel once;
    on accelerators the image tower waits in host memory while the text tower trains
    (`parallel.to_host`). `results.json` lists each phase's wall time and peak resident
    memory ("phases")."""
    workdir = pathlib.Path(workdir)
    export_dir = classifier_lib.export_dir(config, workdir)
    if jax.process_index() == 0:
        atomic.clean_leftovers(export_dir)  # temporaries of an export killed in a past run
    job = _Job(config)
    results.write_json(workdir / "train_split.json", data.training_examples(config.data))
    key = _calibration_key(config)
    qstate, zeroshot_text, rows = _calibrated(config, job, shared)
    ptq_state, compensated = qstate, qstate is not None and config.quant.compensation == "qwt"
    if compensated:
        if shared is not None and (key, "qwt") in shared:
            logging.info("QwT compensation: reused from an earlier run")
            qstate, qwt_row = shared[key, "qwt"]
        else:
            qstate, qwt_row = _qwt(job, qstate, rows[1])
            if shared is not None:
                shared[key, "qwt"] = (qstate, dict(qwt_row))
        rows.append(dict(qwt_row))
        qstate = job.place(qstate)
    calibration_seconds = rows[-1]["calibration_seconds"]  # of the model it trains on
    teacher, teacher_test = _teacher(config, job, zeroshot_text, rows)
    base_to_new = config.data.subsample == "base"
    if base_to_new:
        job.phases.start("base-to-new: FP and PTQ")
        measured_new = (_baselines_on_new(config, job, job.place(ptq_state), qstate)
                        if compensated else _baselines_on_new(config, job, qstate))
    del ptq_state
    source = image_tower = None
    start = time.perf_counter()
    if features.uses_cache(config):
        job.phases.start("feature cache")
        if qstate is not None:
            # The cache reads the image towers only: the text tower's FP kernels go first.
            job.params = job.place(sites.replace_kernels(job.params, {
                name: k for name, k in qstate.kernels.items() if name.startswith("text/")}))
        source = features.cached_input(config, model=job.model, params=job.params,
                                       qstate=qstate, mesh=job.mesh, workdir=workdir)
    training_seconds = time.perf_counter() - start
    distills = recipe(config)["distillation"] != "none"
    teacher_train = _teacher_train_top1(job, teacher, source) if distills else None
    if source is not None and qstate is not None:
        job.params = job.place(qstate.quantized_params(job.params))  # the FP kernels go
        if parallel.host_memory_is_separate():
            # The params hold the quantized kernels now; the image tower's wait on the host.
            qstate = qstate.replace(kernels={})
            image_tower = parallel.to_host(job.params.pop("visual"))
    start = time.perf_counter()
    out = train.train(config, model=job.model, params=job.params, qstate=qstate,
                      teacher=teacher, class_names=job.info.class_names, mesh=job.mesh,
                      workdir=workdir, source=source, phases=job.phases)
    training_seconds += time.perf_counter() - start
    job.phases.start("evaluation")
    if image_tower is not None:
        job.params = {**job.params, "visual": job.place(image_tower)}
        del image_tower  # the host copy
        kernels = sites.kernels(job.params)
        qstate = qstate.replace(kernels={name: kernels[name] for name in qstate.weights})
    qconfig = None if qstate is None else qstate.config.name
    trained_recipe = recipe(config, {**teacher.origin, "train_top1": teacher_train,
                                     "test_top1": teacher_test})
    variables = out.trained.variables(job.params, job.inference(qstate))
    rows.append({"method": config.p4q.method, "qconfig": qconfig, "recipe": trained_recipe,
                 **_trained_accuracy(job, out.trained, variables, desc=config.p4q.method)})
    if base_to_new:
        job.phases.start("base-to-new evaluation")
        rows = _with_new_classes(config, job, rows, qstate, out.trained, measured_new)
    job.phases.start("export")
    writer = results.metric_writer(workdir)
    writer.write_scalars(out.history[-1]["step"] if out.history else 0, {
        f"eval/{row['method']}_{k}": row[k] for row in rows for k in ("top1", "top5")})
    writer.close()
    _export(job, workdir, export_dir, qstate, out.trained, trained_recipe)
    sizes = _export_sizes(export_dir) if jax.process_index() == 0 else {}
    rows[-1].update(costs.fields(
        trainable=costs.trainable_count(out.trained, train_prompts=config.p4q.train_prompts),
        compensation=costs.compensation_count(qstate), calibration_seconds=calibration_seconds,
        training_seconds=training_seconds, bytes_on_disk=sizes.get("export")))
    for row in rows[1:-1]:  # PTQ (and QwT): their towers, as this run exported them
        row["bytes"] = sizes.get(row["method"])
    results.plot_curves(workdir / "training_curves.png", out.history,
                        title=f"{config.p4q.method} on {config.data.name}")
    return job.finish(workdir, job.results("p4q", rows, qconfig=qconfig, history=out.history,
                                           export=str(export_dir)))


def _export(job, workdir, export_dir, qstate, trained, trained_recipe):
    """Process 0 writes the trained classifier (`classifier.save`) with its origin: the base
    model, the training data, the method and its recipe."""
    if jax.process_index() == 0:
        config = job.config
        classifier_lib.save(export_dir, job.model, jax.device_get(job.params),
                            jax.device_get(qstate), trained, origin={
                                "model": {"config": job.model.config.to_dict(),
                                          "weights": job.weights},
                                "data": job.data_origin(), "method": config.p4q.method,
                                "recipe": trained_recipe},
                            run=preflight.export_writer(config, workdir))


def _export_sizes(export):
    """Bytes on disk of an export: {"export": all of it, "qwt": its towers, "ptq": the
    towers without QwT's compensation (`quant.export` keeps it in towers/compensation/)}."""
    towers = export / "towers"
    compensation = towers / "compensation"
    size = storage.bytes_on_disk(towers)
    return {"export": storage.bytes_on_disk(export), "qwt": size,
            "ptq": size - (storage.bytes_on_disk(compensation) if compensation.exists() else 0)}


def qat(config, workdir, *, shared=None):
    """Calibrate -> zero-shot FP and PTQ -> QAT (`p4q_jax/qat.py`: both towers, their learned
    steps and the prompts) -> evaluate -> export (the towers as integer kernels with the
    learned steps, the prompts), results.json with a "qat" row (its `trainable_params`),
    training curves and train_split.json. Resumes from WORKDIR/checkpoints like `p4q`;
    `shared` as there (the calibration, FP zero-shot and PTQ rows)."""
    workdir = pathlib.Path(workdir)
    export_dir = classifier_lib.export_dir(config, workdir)
    if jax.process_index() == 0:
        atomic.clean_leftovers(export_dir)
    job = _Job(config)
    results.write_json(workdir / "train_split.json", data.training_examples(config.data))
    qstate, zeroshot_text, rows = _calibrated(config, job, shared)
    teacher, teacher_test = _teacher(config, job, zeroshot_text, rows)
    distills = recipe(config)["distillation"] != "none"
    teacher_train = _teacher_train_top1(job, teacher, None) if distills else None
    start = time.perf_counter()
    out = qat_lib.train(config, model=job.model, params=job.params, qstate=qstate,
                        teacher=teacher, class_names=job.info.class_names, mesh=job.mesh,
                        workdir=workdir, phases=job.phases)
    training_seconds = time.perf_counter() - start
    job.phases.start("evaluation")
    job.params, qstate = job.place(out.params), job.place(out.qstate)
    trained_recipe = {**recipe(config, {**teacher.origin, "train_top1": teacher_train,
                                        "test_top1": teacher_test}),
                      "towers": "trained (LSQ)"}
    variables = out.trained.variables(job.params, job.inference(qstate))
    rows.append({"method": config.p4q.method, "qconfig": qstate.config.name,
                 "recipe": trained_recipe,
                 **_trained_accuracy(job, out.trained, variables, desc=config.p4q.method)})
    job.phases.start("export")
    _export(job, workdir, export_dir, qstate, out.trained, trained_recipe)
    rows[-1].update(costs.fields(
        trainable=out.trainable_params, calibration_seconds=rows[1]["calibration_seconds"],
        training_seconds=training_seconds,
        bytes_on_disk=storage.bytes_on_disk(export_dir) if jax.process_index() == 0 else None))
    results.plot_curves(workdir / "training_curves.png", out.history,
                        title=f"{config.p4q.method} on {config.data.name}")
    return job.finish(workdir, job.results("qat", rows, qconfig=qstate.config.name,
                                           history=out.history, export=str(export_dir)))


def evaluate_export(config, workdir):
    """Top-1/top-5 of an exported P4Q model (`p4q.export_dir`, default WORKDIR/export) on
    the test split -> eval_results.json (a training workdir's results.json is kept)."""
    path = classifier_lib.export_dir(config, workdir)
    model, params, qstate, trained = classifier_lib.load(path)
    job = _Job(config, model_and_params=(model, params))
    transfer = tuple(job.info.class_names) != trained.class_names
    if transfer:
        logging.info("%s: the learned context goes in front of its %d class names (the export "
                     "was trained on %d others)", config.data.name, len(job.info.class_names),
                     len(trained.class_names))
        trained = trained.for_classes(job.info.class_names)
    job.phases.start("evaluation")
    variables = trained.variables(job.params, job.inference(qstate))
    metrics = _trained_accuracy(job, trained, variables, desc="P4Q eval")
    row = {"method": config.p4q.method, "qconfig": None if qstate is None else qstate.config.name,
           **metrics}
    return job.finish(workdir, job.results("eval", [row], export=str(path),
                                           transfer=transfer))


def teacher_lines(rows):
    """One line per distinct teacher of the demo's trained rows: its top-1 on both splits."""
    seen = {}
    for row in rows:
        teacher = (row.get("recipe") or {}).get("teacher")
        if teacher:
            name = ("FP zero-shot" if teacher["kind"] == teacher_lib.ZEROSHOT
                    else f"{variants.row_label(teacher['method'])} export")
            seen.setdefault(name, (teacher["train_top1"], teacher["test_top1"]))
    return [f"teacher ({name}): top-1 {train:.2f} on the train split, {test:.2f} on the test "
            "split" for name, (train, test) in seen.items()]


def demo(config, workdir):
    """FP zero-shot, CoOp-FP (`demo.coop_fp`), FP P4Q (`demo.fp_p4q`), then PTQ and P4Q at
    each bit setting of `config.demo.qconfigs`, then the variants of `demo.ablations` at
    `demo.ablation_qconfig` (`p4q.variants`: the ablations, whose trained-teacher one
    distils from the FP P4Q run's export, and baselines such as `qwt_p4q`, which adds the
    QwT row), then QAT at that bit setting (`demo.qat`, `configs/methods.py`).

    Each training is a `p4q` run in its own WORKDIR/<name>/ (its own results.json, curves,
    checkpoints and export); runs of one bit setting share its calibration and feature
    cache. Prints the table and the teachers' accuracies, and writes results.json,
    results.md and results.png (top-1 bars) to the workdir. Each row keeps its run's cost
    columns (`costs.FIELDS`); a row that several runs report (FP zero-shot, PTQ of a bit
    setting) is the first run's."""
    workdir = pathlib.Path(workdir)
    todo = _demo_runs(config, workdir)
    runs, rows, shared = {}, [], {}
    for i, (name, (sub, subdir)) in enumerate(todo.items()):
        logging.info("demo %d/%d: %s (%s)", i + 1, len(todo), sub.p4q.method, name)
        runs[name] = run = _demo_job(sub)(sub, subdir, shared=shared)
        for row in run["rows"]:
            row = {**row, "qconfig": row.get("qconfig")}
            if not any((r["method"], r["qconfig"]) == (row["method"], row["qconfig"])
                       for r in rows):
                rows.append(row)
    table = tables.demo_table(rows)
    first = next(iter(runs.values()))
    teachers = "\n".join(teacher_lines(rows))
    if jax.process_index() == 0:
        print(f"\n{config.data.name}, {first['num_classes']} classes:\n{table}\n{teachers}")
    results.write_text(workdir / "results.md", f"{table}\n{teachers}\n")
    settings = list(config.demo.qconfigs)
    bars = {"FP zero-shot": [rows[0]["top1"]] * len(settings)}
    for method in ("coop_fp", "fp_p4q"):
        fp_rows = [r["top1"] for r in rows if r["method"] == method]
        if fp_rows:
            bars[variants.row_label(method)] = fp_rows * len(settings)
    for method in ("ptq", "qwt", "p4q", "qwt_p4q", "qat"):
        if any(r["method"] == method for r in rows):
            bars[variants.row_label(method)] = [
                next((r["top1"] for r in rows if r["method"] == method and r["qconfig"] == q),
                     None) for q in settings]
    results.plot_bars(workdir / "results.png", settings, bars,
                      title=f"{config.data.name}: top-1 on the test split")
    out = {"mode": "demo", "smoke_run": first["smoke_run"], "checkpoint": first["checkpoint"],
           "model": first["model"], "dataset": first["dataset"],
           "num_classes": first["num_classes"], "num_templates": first["num_templates"],
           "rows": rows, "runs": {name: str(workdir / name) for name in runs}}
    results.write_json(workdir / "results.json", out)
    if jax.process_index() == 0:
        logging.info("results -> %s (+ results.md, results.png)", workdir / "results.json")
    return out


_FP_RUNS = {"coop_fp": "fp32_coop", "fp_p4q": "fp32_p4q"}  # the demo's FP runs' directories


def _demo_run(config, workdir, variant=None, *, qconfig=None):
    """One of the demo's p4q runs, as `variant` (`p4q.variants`; None: P4Q) at `qconfig`:
    (its config, WORKDIR/<name>)."""
    sub = config.copy_and_resolve_references()
    sub.p4q.export_dir = None
    if qconfig is not None:
        sub.quant.config = qconfig
    if variant is not None:
        variants.apply(sub, variant)
    name = _FP_RUNS[variant] if not sub.p4q.quantize else "_".join(
        filter(None, (sub.quant.config, variant)))
    # Runs of one bit setting (and the FP ones) share the features of their image towers;
    # QwT's compensated towers give others.
    cache = sub.quant.config + ("_qwt" if sub.quant.compensation == "qwt" else "")
    sub.speed.cache_dir = str(pathlib.Path(workdir) / "feature_cache" /
                              (cache if sub.p4q.quantize else "fp32"))
    return sub, pathlib.Path(workdir) / name


def _demo_job(sub):
    """The job that runs one of the demo's runs: `qat` for its QAT run (`demo.qat`), else
    `p4q`; both take the demo's calibration memo."""
    return qat if sub.mode == "qat" else p4q


def _demo_runs(config, workdir):
    """The demo's runs: {name: (config, WORKDIR/<name>)}: CoOp-FP (`fp32_coop`, with
    `demo.coop_fp`), FP P4Q (`fp32_p4q`, with `demo.fp_p4q`), one per bit setting, one
    per variant of `demo.ablations` (`<bits>_<variant>`), then QAT (`<bits>_qat`, with
    `demo.qat`)."""
    demo_cfg = config.demo
    todo = [_demo_run(config, workdir, variant) for variant in _FP_RUNS if demo_cfg[variant]]
    todo += [_demo_run(config, workdir, qconfig=name) for name in demo_cfg.qconfigs]
    todo += [_demo_run(config, workdir, variant, qconfig=demo_cfg.ablation_qconfig)
             for variant in demo_cfg.ablations]
    if demo_cfg.qat:
        sub, subdir = _demo_run(config, workdir, qconfig=demo_cfg.ablation_qconfig)
        sub.mode, sub.p4q.method, sub.p4q.adapter = "qat", "qat", False
        todo.append((sub, subdir.with_name(f"{subdir.name}_qat")))
    for sub, _ in todo:
        if sub.loss.teacher is None:  # the trained-teacher variant: the FP P4Q run's export
            sub.loss.teacher = str(pathlib.Path(workdir) / _FP_RUNS["fp_p4q"] / "export")
    return {subdir.name: (sub, subdir) for sub, subdir in todo}


MODES = {"zeroshot": zeroshot, "ptq": ptq, "p4q": p4q, "qat": qat, "eval": evaluate_export,
         "demo": demo}


def run(config, workdir, *, mode=None):
    """Runs `mode` (default `config.mode`) in `workdir` -> its results dict.

    Before any work the config is checked (`preflight.check`: every field, path and batch
    size), paths are made absolute, the workdir is locked for the run (`runlock`: a second
    run in it is refused), and nothing earlier is overwritten: a workdir holding checkpoints
    or results of a run with another config is refused (or, with `checkpoint.restart`, that
    run is moved aside), and so is an export path that is not this run's export."""
    mode = mode or config.mode
    if mode not in MODES:
        raise preflight.ConfigError(f"mode {mode!r} is not available; choose one of "
                                    f"{sorted(MODES)}")
    config, workdir = preflight.check(config, workdir, mode=mode)
    with runlock.held(workdir):
        training = {"p4q": lambda: [(config, workdir)], "qat": lambda: [(config, workdir)],
                    "demo": lambda: list(_demo_runs(config, workdir).values())}.get(mode, list)()
        for run_config, run_workdir in training:
            preflight.check_export(run_config, run_workdir)
            preflight.check_resumable(run_config, run_workdir)
        if mode in ("zeroshot", "ptq", "eval"):
            preflight.check_results(config, workdir, mode)
        logging.info("mode %s, workdir %s, config:\n%s", mode, workdir, config)
        return MODES[mode](config, workdir)
