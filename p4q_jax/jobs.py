"""The jobs that `main.py` runs, one function per mode, each `(config, workdir) -> results`."""

import pathlib

import jax
import jax.numpy as jnp
from absl import logging

from p4q_jax import clip
from p4q_jax import data
from p4q_jax import evaluate
from p4q_jax import parallel
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


def zeroshot(config, workdir):
    """Zero-shot top-1/top-5 of a CLIP on the dataset's test split -> results.json."""
    mesh = parallel.make_mesh(data=config.mesh.data, model=config.mesh.model)
    parallel.check_batch_size(config.eval.batch_size, mesh, name="eval.batch_size")
    model, params, smoke = build_model(config)
    info = data.info_from_config(config.data)
    variables = parallel.replicate({"params": params}, mesh)
    classifier = evaluate.zeroshot_classifier(
        model, variables, data.prompts(info.class_names, info.templates), mesh=mesh,
        batch_size=config.eval.text_batch_size)
    size = model.config.vision.image_size
    dataset = data.create_dataset(config.data, split="test", batch_size=config.eval.batch_size,
                                  image_size=size, train=False)
    step = evaluate.make_eval_step(evaluate.fp_image_features(model), mesh=mesh,
                                   num_classes=len(info.class_names))
    metrics = evaluate.accuracy(
        step, variables, classifier, data.as_numpy_batches(dataset), mesh=mesh,
        total=data.num_eval_batches(config.data, split="test", batch_size=config.eval.batch_size),
        desc="zero-shot")
    out = {
        "mode": "zeroshot",
        "smoke_run": smoke,
        "checkpoint": config.model.checkpoint,
        "model": model.config.to_dict(),
        "dataset": config.data.name,
        "num_classes": len(info.class_names),
        "num_templates": len(info.templates),
        "rows": [{"method": "fp_zeroshot", **metrics}],
    }
    path = pathlib.Path(workdir) / "results.json"
    results.write_json(path, out)
    logging.info("zero-shot %s: top-1 %.2f top-5 %.2f (%d images) -> %s%s", config.data.name,
                 metrics["top1"], metrics["top5"], metrics["count"], path,
                 " [SMOKE RUN: random weights, the accuracy is meaningless]" if smoke else "")
    return out


MODES = {"zeroshot": zeroshot}


def run(config, workdir, *, mode=None):
    mode = mode or config.mode
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not available; choose one of {sorted(MODES)}")
    logging.info("mode %s, workdir %s, config:\n%s", mode, workdir, config)
    return MODES[mode](config, workdir)
