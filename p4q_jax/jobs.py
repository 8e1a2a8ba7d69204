"""The jobs that `main.py` runs, one function per mode, each `(config, workdir) -> results`."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
from absl import logging

from p4q_jax import atomic
from p4q_jax import clip
from p4q_jax import data
from p4q_jax import evaluate
from p4q_jax import parallel
from p4q_jax import phases as phases_lib
from p4q_jax import preflight
from p4q_jax import quant
from p4q_jax import results
from p4q_jax import train
from p4q_jax.clip import checkpoints
from p4q_jax.configs import baselines
from p4q_jax.p4q import trained as trained_lib
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
        self.params = self.place(params)  # on the devices once, large kernels split over `model`
        on_device, total = parallel.bytes_per_device(self.params)
        logging.info("frozen params: %.1f of %.1f MB on each device (mesh %s)", on_device / 2**20,
                     total / 2**20, dict(self.mesh.shape))
        self.info = data.info_from_config(config.data)
        self.prompts = data.prompts(self.info.class_names, self.info.templates)
        self.image_size = self.model.config.vision.image_size
        self._step = evaluate.make_eval_step(evaluate.image_features(self.model), mesh=self.mesh,
                                             num_classes=len(self.info.class_names))

    def place(self, tree):
        """Frozen arrays -> placed on the mesh (`parallel.place_weights`)."""
        return parallel.place_weights(tree, self.mesh, min_size=self.config.mesh.shard_min_size)

    def inference(self, qstate):
        """The state quantized inference runs on (`quant.integer`), placed on the mesh."""
        return self.place(
            integer.inference_state(qstate, self.params, self.config.quant.get("integer")))

    def variables(self, qstate=None):
        return {"params": self.params, "qstate": self.inference(qstate)}

    def classifier(self, variables):
        return evaluate.zeroshot_classifier(self.model, variables, self.prompts, mesh=self.mesh,
                                            batch_size=self.config.eval.text_batch_size)

    def accuracy(self, variables, classifier, *, desc, step=None):
        cfg = self.config
        dataset = data.create_dataset(cfg.data, split="test", batch_size=cfg.eval.batch_size,
                                      image_size=self.image_size, train=False)
        return evaluate.accuracy(
            step or self._step, variables, classifier, data.as_numpy_batches(dataset),
            mesh=self.mesh,
            total=data.num_eval_batches(cfg.data, split="test", batch_size=cfg.eval.batch_size),
            desc=desc)

    def results(self, mode, rows, **extra):
        return {
            "mode": mode,
            "smoke_run": self.smoke,
            "checkpoint": self.config.model.checkpoint,
            "model": self.model.config.to_dict(),
            "dataset": self.config.data.name,
            "num_classes": len(self.info.class_names),
            "num_templates": len(self.info.templates),
            "rows": rows,
            **extra,
        }

    def finish(self, workdir, out):
        self.phases.stop()
        out["phases"] = self.phases.records
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
    return job.finish(workdir, job.results("zeroshot", [{"method": "fp_zeroshot", **metrics}]))


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
                                **job.accuracy(fp, teacher, desc="FP zero-shot")}]
    texts = [t for class_prompts in job.prompts for t in class_prompts]
    qconfig = quant.QConfig.parse(job.config.quant.config)
    job.phases.start("calibration")
    images, num_images = calibration_images(job, qconfig)
    qstate, fp_text, report = quant.calibrate(
        job.model, job.params, qconfig, images=images, num_images=num_images, texts=texts,
        text_batch_size=job.config.eval.text_batch_size, return_text_features=True,
        search_rows=job.config.quant.search_rows, return_report=True)
    teacher = evaluate.ensemble(fp_text, num_classes=len(job.prompts))
    job.phases.start("zero-shot and PTQ evaluation")
    q = job.variables(qstate)
    return qstate, teacher, [
        {"method": "fp_zeroshot", **job.accuracy(fp, teacher, desc="FP zero-shot")},
        {"method": "ptq", "qconfig": qconfig.name,
         **job.accuracy(q, job.classifier(q), desc=f"PTQ {qconfig.name}"),
         "diagnostics": report.to_dict()}]


def ptq(config, workdir):
    """Calibrate -> zero-shot FP and PTQ on the test split -> results.json."""
    job = _Job(config)
    qstate, _, rows = _fp_and_ptq(job)
    return job.finish(workdir, job.results("ptq", rows, qconfig=qstate.config.name))


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


def _baselines_on_new(config, job, qstate):
    """FP zero-shot and PTQ top-1/top-5 on the new half: {method: metrics}."""
    new = _new_classes_job(config, job)
    fp = new.variables()
    measured = {"fp_zeroshot": new.accuracy(fp, new.classifier(fp), desc="FP zero-shot, new")}
    if qstate is not None:
        q = new.variables(qstate)
        measured["ptq"] = new.accuracy(q, new.classifier(q), desc="PTQ, new")
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


def p4q(config, workdir):
    """Calibrate -> zero-shot FP and PTQ -> train P4Q -> evaluate -> export, results.json,
    training curves, and the exact training images in train_split.json. With
    `p4q.quantize=False` the FP model is trained (CoOp baseline). Trained on the base half
    of a CoOp dataset's classes (`data.subsample="base"`), each row also holds its accuracy on
    the new half ("new") and the harmonic mean ("hm").

    Lean: every FP measurement comes first; the text tower's FP kernels of quantized layers
    go before the feature cache is built (it reads the image towers only), the image
    tower's once the cache holds the FP teacher's features (the job's params become
    `qstate.quantized_params`), so training, evaluation and export hold each kernel once;
    on accelerators the image tower waits in host memory while the text tower trains
    (`parallel.to_host`). `results.json` lists each phase's wall time and peak resident
    memory ("phases")."""
    workdir = pathlib.Path(workdir)
    export_dir = trained_lib.export_dir(config, workdir)
    if jax.process_index() == 0:
        atomic.clean_leftovers(export_dir)  # temporaries of an export killed in a past run
    job = _Job(config)
    results.write_json(workdir / "train_split.json", data.training_examples(config.data))
    qstate, teacher, rows = _fp_and_ptq(job, quantize=config.p4q.quantize)
    qstate = job.place(qstate)
    base_to_new = config.data.get("subsample", "all") == "base"
    if base_to_new:
        job.phases.start("base-to-new: FP and PTQ")
        measured_new = _baselines_on_new(config, job, qstate)
    source = image_tower = None
    if qstate is not None and train.uses_feature_cache(config):
        job.phases.start("feature cache")
        # The cache reads the image towers only: the text tower's FP kernels go first.
        job.params = job.place(sites.replace_kernels(job.params, {
            name: k for name, k in qstate.kernels.items() if name.startswith("text/")}))
        source = train.feature_cache(config, model=job.model, params=job.params, qstate=qstate,
                                     mesh=job.mesh, workdir=workdir)
        job.params = job.place(qstate.quantized_params(job.params))  # the FP kernels go
        if parallel.host_memory_is_separate():
            # The params hold the quantized kernels now; the image tower's wait on the host.
            qstate = qstate.replace(kernels={})
            image_tower = parallel.to_host(job.params.pop("visual"))
    out = train.train(config, model=job.model, params=job.params, qstate=qstate,
                      teacher_text=teacher, class_names=job.info.class_names, mesh=job.mesh,
                      workdir=workdir, source=source, phases=job.phases)
    job.phases.start("evaluation")
    if image_tower is not None:
        job.params = {**job.params, "visual": job.place(image_tower)}
        del image_tower  # the host copy
        kernels = sites.kernels(job.params)
        qstate = qstate.replace(kernels={name: kernels[name] for name in qstate.weights})
    qconfig = None if qstate is None else qstate.config.name
    variables = out.trained.variables(job.params, job.inference(qstate))
    rows.append({"method": config.p4q.method, "qconfig": qconfig,
                 **_trained_accuracy(job, out.trained, variables, desc=config.p4q.method)})
    if base_to_new:
        job.phases.start("base-to-new evaluation")
        rows = _with_new_classes(config, job, rows, qstate, out.trained, measured_new)
    job.phases.start("export")
    writer = results.metric_writer(workdir)
    writer.write_scalars(out.history[-1]["step"] if out.history else 0, {
        f"eval/{row['method']}_{k}": row[k] for row in rows for k in ("top1", "top5")})
    writer.close()
    if jax.process_index() == 0:
        trained_lib.save(export_dir, job.model, jax.device_get(job.params),
                         jax.device_get(qstate), out.trained)
    results.plot_curves(workdir / "training_curves.png", out.history,
                        title=f"{config.p4q.method} on {config.data.name}")
    return job.finish(workdir, job.results("p4q", rows, qconfig=qconfig, history=out.history,
                                           export=str(export_dir)))


def evaluate_export(config, workdir):
    """Top-1/top-5 of an exported P4Q model (`p4q.export_dir`, default WORKDIR/export) on
    the test split -> eval_results.json (a training workdir's results.json is kept)."""
    path = trained_lib.export_dir(config, workdir)
    model, params, qstate, trained = trained_lib.load(path)
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


_DEMO_NAMES = {"fp_zeroshot": "FP zero-shot", "coop_fp": "CoOp-FP", "ptq": "PTQ", "p4q": "P4Q"}
_COOP_FP_RUN = "fp32_coop"  # the demo's CoOp-FP run, beside one directory per bit setting


def demo_report(rows):
    """The demo's table (markdown) from its rows."""
    return results.markdown_table(
        ["bits", "method", "top-1 (%)", "top-5 (%)", "size on disk (bytes)"],
        [[row["qconfig"] or "fp32", _DEMO_NAMES[row["method"]], f"{row['top1']:.2f}",
          f"{row['top5']:.2f}", "-" if row["bytes"] is None else f"{row['bytes']:,}"]
         for row in rows])


def demo(config, workdir):
    """FP zero-shot, CoOp-FP (`demo.coop_fp`), then PTQ and P4Q at each bit setting of
    `config.demo.qconfigs`.

    Each training is a `p4q` run in its own WORKDIR/<setting>/ (`fp32_coop` for CoOp-FP; its
    own results.json, curves, checkpoints and export). Prints the table and writes
    results.json, results.md (the table) and results.png (top-1 bars) to the workdir. Sizes are
    bytes on disk: the FP checkpoint, the exported quantized towers (PTQ), and the towers plus
    prompts and adapter (P4Q; for CoOp-FP, its export: the FP towers plus prompts)."""
    workdir = pathlib.Path(workdir)
    todo = _demo_runs(config, workdir)
    runs, rows = {}, []
    for i, (name, (sub, subdir)) in enumerate(todo.items()):
        logging.info("demo %d/%d: %s", i + 1, len(todo),
                     "CoOp on the FP model" if name == _COOP_FP_RUN else f"PTQ and P4Q at {name}")
        runs[name] = run = p4q(sub, subdir)
        fp, *quantized, trained = run["rows"]
        export = pathlib.Path(run["export"])
        if not rows:
            checkpoint = config.model.checkpoint
            rows.append({**fp, "qconfig": None,
                         "bytes": checkpoints.bytes_on_disk(checkpoint) if checkpoint else None})
        rows += [{**row, "bytes": checkpoints.bytes_on_disk(export / "towers")}
                 for row in quantized]
        rows.append({**trained, "bytes": checkpoints.bytes_on_disk(export)})
    table = demo_report(rows)
    first = next(iter(runs.values()))
    if jax.process_index() == 0:
        print(f"\n{config.data.name}, {first['num_classes']} classes:\n{table}")
    results.write_text(workdir / "results.md", table)
    settings = list(config.demo.qconfigs)
    bars = {"FP zero-shot": [rows[0]["top1"]] * len(settings)}
    if _COOP_FP_RUN in runs:
        bars["CoOp-FP"] = [runs[_COOP_FP_RUN]["rows"][-1]["top1"]] * len(settings)
    bars |= {"PTQ": [r["top1"] for r in rows if r["method"] == "ptq"],
             "P4Q": [r["top1"] for r in rows if r["method"] == "p4q"]}
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


def _demo_runs(config, workdir):
    """The demo's p4q runs: {name: (config, WORKDIR/<name>)}, CoOp-FP first (`fp32_coop`, with
    `demo.coop_fp`), then one per bit setting."""
    runs = {}
    if config.demo.get("coop_fp", False):
        sub = baselines.apply(config.copy_and_resolve_references(), "coop_fp")
        sub.p4q.export_dir = None
        runs[_COOP_FP_RUN] = (sub, pathlib.Path(workdir) / _COOP_FP_RUN)
    for name in config.demo.qconfigs:
        sub = config.copy_and_resolve_references()
        sub.quant.config = name
        sub.p4q.export_dir = None
        runs[name] = (sub, pathlib.Path(workdir) / name)
    return runs


MODES = {"zeroshot": zeroshot, "ptq": ptq, "p4q": p4q, "eval": evaluate_export, "demo": demo}


def run(config, workdir, *, mode=None):
    """Runs `mode` (default `config.mode`) in `workdir` -> its results dict.

    Before any work the config is checked (`preflight.check`: every field, path and batch
    size), paths are made absolute, and a workdir holding checkpoints of a run with another
    config is refused (or, with `checkpoint.restart`, that run is moved aside)."""
    mode = mode or config.mode
    if mode not in MODES:
        raise preflight.ConfigError(f"mode {mode!r} is not available; choose one of "
                                    f"{sorted(MODES)}")
    config, workdir = preflight.check(config, workdir, mode=mode)
    training = {"p4q": lambda: [(config, workdir)],
                "demo": lambda: list(_demo_runs(config, workdir).values())}.get(mode, list)()
    for run_config, run_workdir in training:
        preflight.check_resumable(run_config, run_workdir)
    logging.info("mode %s, workdir %s, config:\n%s", mode, workdir, config)
    return MODES[mode](config, workdir)
