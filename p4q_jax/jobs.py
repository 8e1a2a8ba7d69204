"""The jobs that `main.py` runs, one function per mode, each `(config, workdir) -> results`."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
from absl import logging

from p4q_jax import clip
from p4q_jax import data
from p4q_jax import evaluate
from p4q_jax import parallel
from p4q_jax import quant
from p4q_jax import results


def initialize_distributed(config):
    """Joins a multi-host run when the config asks for it (before any JAX computation)."""
    cfg = config.distributed
    if cfg.auto:
        jax.distributed.initialize()
    elif cfg.coordinator_address:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id)


def build_model(config):
    """(model, params, is_smoke_run) from `config.model`: a checkpoint, or a random init."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.checkpoint:
        model, params = clip.load(config.model.checkpoint, dtype=dtype,
                                  activation=config.model.activation)
        return model, params, False
    logging.warning(
        "SMOKE RUN: no --config.model.checkpoint given, so a randomly initialised %r CLIP "
        "is used. It exercises the whole pipeline; its accuracy is chance level.",
        config.model.name)
    model, params = clip.init(config.model.name, seed=config.seed, dtype=dtype)
    return model, params, True


class _Job:
    """What every mode sets up: mesh, model, dataset info, and a sharded evaluator."""

    def __init__(self, config):
        self.config = config
        self.mesh = parallel.make_mesh(data=config.mesh.data, model=config.mesh.model)
        parallel.check_batch_size(config.eval.batch_size, self.mesh, name="eval.batch_size")
        self.model, params, self.smoke = build_model(config)
        self.params = parallel.replicate(params, self.mesh)  # copied to the devices once
        self.info = data.info_from_config(config.data)
        self.prompts = data.prompts(self.info.class_names, self.info.templates)
        self.image_size = self.model.config.vision.image_size
        self._step = evaluate.make_eval_step(evaluate.image_features(self.model), mesh=self.mesh,
                                             num_classes=len(self.info.class_names))

    def variables(self, qstate=None):
        return {"params": self.params, "qstate": parallel.replicate(qstate, self.mesh)}

    def classifier(self, variables):
        return evaluate.zeroshot_classifier(self.model, variables, self.prompts, mesh=self.mesh,
                                            batch_size=self.config.eval.text_batch_size)

    def accuracy(self, variables, classifier, *, desc):
        cfg = self.config
        dataset = data.create_dataset(cfg.data, split="test", batch_size=cfg.eval.batch_size,
                                      image_size=self.image_size, train=False)
        return evaluate.accuracy(
            self._step, variables, classifier, data.as_numpy_batches(dataset), mesh=self.mesh,
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
        path = pathlib.Path(workdir) / "results.json"
        results.write_json(path, out)
        for row in out["rows"]:
            logging.info("%s %s: top-1 %.2f top-5 %.2f (%d images)", row["method"],
                         self.config.data.name, row["top1"], row["top5"], row["count"])
        logging.info("results -> %s%s", path, " [SMOKE RUN: random weights, the accuracy is "
                     "meaningless]" if self.smoke else "")
        return out


def zeroshot(config, workdir):
    """Zero-shot top-1/top-5 of a CLIP on the dataset's test split -> results.json."""
    job = _Job(config)
    variables = job.variables()
    metrics = job.accuracy(variables, job.classifier(variables), desc="zero-shot")
    return job.finish(workdir, job.results("zeroshot", [{"method": "fp_zeroshot", **metrics}]))


def calibration_images(job):
    """`config.quant.calib_batches` training batches (global arrays), for the image tower."""
    cfg = job.config
    dataset = data.create_dataset(cfg.data, split="train", batch_size=cfg.quant.calib_batch_size,
                                  image_size=job.image_size, train=True, seed=cfg.seed)
    batches = itertools.islice(data.as_numpy_batches(dataset), cfg.quant.calib_batches)
    return [parallel.to_global(b["image"], job.mesh) for b in batches]


def ptq(config, workdir):
    """Calibrate -> zero-shot FP and PTQ on the test split -> results.json."""
    job = _Job(config)
    texts = [t for class_prompts in job.prompts for t in class_prompts]
    qconfig = quant.QConfig.parse(config.quant.config)
    qstate, fp_text = quant.calibrate(
        job.model, job.params, qconfig, images=calibration_images(job), texts=texts,
        text_batch_size=config.eval.text_batch_size, return_text_features=True)
    fp = job.variables()
    fp_metrics = job.accuracy(fp, evaluate.ensemble(fp_text, num_classes=len(job.prompts)),
                              desc="FP zero-shot")
    q = job.variables(qstate)
    ptq_metrics = job.accuracy(q, job.classifier(q), desc=f"PTQ {qconfig.name}")
    rows = [{"method": "fp_zeroshot", **fp_metrics},
            {"method": "ptq", "qconfig": qconfig.name, **ptq_metrics}]
    return job.finish(workdir, job.results("ptq", rows, qconfig=qconfig.name))


MODES = {"zeroshot": zeroshot, "ptq": ptq}


def run(config, workdir, *, mode=None):
    mode = mode or config.mode
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not available; choose one of {sorted(MODES)}")
    logging.info("mode %s, workdir %s, config:\n%s", mode, workdir, config)
    return MODES[mode](config, workdir)
