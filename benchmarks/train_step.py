"""One P4Q train step of ViT-B/32 (random weights, W4A4): speed and peak memory per speed rule.

    python benchmarks/train_step.py [--model=ViT-B/32] [--batches=32,128] [--steps=3]
        [--steps_off=1] [--settings=all_on,no_feature_cache,no_crop_text,no_shared_prefix,
        no_length_buckets,all_off]
    python benchmarks/train_step.py --model=tiny --steps=1   # a quick smoke run
    python benchmarks/train_step.py --dataset=imagenet2012 --model=ViT-B/16 --batches=32 \
        [--remat=off|blocks|dots] [--schedule=auto|memory|concurrency]

The step is the one `p4q_jax.train` runs: n_ctx=16 shared context, class token at the
end, the QAdapter on, default loss weights, the class names of `--dataset` (default CIFAR-100's
100; `imagenet2012`: ImageNet's 1,000, from the registry, no data needed), a 1-device mesh
(all local devices), the `w4a4attn8` quantized CLIP. The speed rules (docs/design.md,
"Speed rules (where the time goes)") are switched on and off:

* feature_cache: the batch carries cached student/teacher image features (random values);
  off, it carries images and both image towers (quantized student, FP teacher) run in it;
* crop_text: the text tower runs on the positions up to the last EOT; off, on all 77;
* shared_prefix: the context prefix common to all classes is encoded once;
* length_buckets: the classes run in up to 4 groups, each padded to its own longest
  prompt (with crop_text only: uncropped prompts keep all 77 positions).

`--remat` rematerialises the text blocks in the backward pass (`config.speed.remat`);
`--schedule` is `config.speed.xla_schedule` (XLA:CPU's scheduling of the step; "auto":
for memory from 500 classes on or with remat, as the training job picks it).

Settings: all rules on, all off, and each single rule off. One subprocess calibrates
(not measured: the text tower on the classes x the first `--templates` of the dataset's
templates, default 1; the image tower on one random batch of 32), then every (setting,
batch) runs in its own subprocess in two phases, as the training job records them
(`p4q_jax.phases`; GB here = 2^30 bytes): "set-up" (JAX, model init, the calibration read
back, the frozen inputs built) and "step" (the memory set-up freed handed back to the
system, as the job's training phase starts, then compilation and the steps). Peak RSS
leaves out TensorFlow (the data pipeline; ~0.5 GB more in a training process). "compile s"
is the first call (trace + compile + one step); "s/step" the median of the timed steps
after it. The batch is on the device before timing starts.

Target on the 2-core CPU dev machine: at most 1.7 s/step and 3 GB peak RSS at batch 32
with all rules on. Measured tables, and the public PyTorch code at the same shapes:
docs/results.md, "P4Q train step and the speed rules".
"""

import json
import pickle
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import host
from p4q_jax import clip
from p4q_jax import data
from p4q_jax import evaluate
from p4q_jax import parallel
from p4q_jax import phases as phases_lib
from p4q_jax import quant
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib

RULES = ("feature_cache", "crop_text", "shared_prefix", "length_buckets")
LENGTH_BUCKETS = 4  # config.speed.length_buckets's default
SETTINGS = {"all_on": RULES, **{f"no_{r}": tuple(x for x in RULES if x != r) for r in RULES},
            "all_off": ()}  # setting -> the rules switched on
N_CTX = 16

_MODEL = flags.DEFINE_string("model", "ViT-B/32", "Named CLIP config (random weights).")
_QUANT = flags.DEFINE_string("quant", "w4a4attn8", "Quantization preset.")
_REMAT = flags.DEFINE_enum("remat", "off", ["off", *clip.model_lib.REMAT_POLICIES],
                           "Rematerialise the text blocks (config.speed.remat).")
_SCHEDULE = flags.DEFINE_enum("schedule", "auto", list(step_lib.XLA_SCHEDULES),
                               "XLA:CPU's schedule of the step (config.speed.xla_schedule).")
_SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), "Settings to measure.")
_BATCHES = flags.DEFINE_list("batches", ["32", "128"], "Global batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the first call.", lower_bound=1)
_STEPS_OFF = flags.DEFINE_integer("steps_off", None,
                                  "Timed steps of the (slow) settings with a rule off; "
                                  "default --steps.", lower_bound=1)
_DATASET = flags.DEFINE_string("dataset", "cifar100",
                               "Registry dataset whose class names the step trains on.")
_TEMPLATES = flags.DEFINE_integer("templates", 1, "Templates of the dataset to calibrate the "
                                  "text on.", lower_bound=1)
# Set by the parent for each subprocess.
_SETTING = flags.DEFINE_enum("setting", None, list(SETTINGS), "Measure this setting only.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch of --setting.")
_CALIBRATION = flags.DEFINE_string("calibration", None,
                                   "Calibration pickle: written when given alone, read with "
                                   "--setting.")


def _calibrate(path):
    """Calibrates the model; pickles ((QState, FP teacher text features [C, E]), class names)."""
    model, params = clip.init(_MODEL.value)
    info = data.get_info(_DATASET.value)
    texts = [t for c in data.prompts(info.class_names, info.templates[:_TEMPLATES.value])
             for t in c]
    size = model.config.vision.image_size
    images = np.random.default_rng(0).normal(size=(32, size, size, 3)).astype(np.float32)
    start = time.perf_counter()
    qstate, fp_text = quant.calibrate(model, params, quant.QConfig.parse(_QUANT.value),
                                      images=[images], texts=texts, return_text_features=True)
    teacher_text = evaluate.ensemble(fp_text, num_classes=len(info.class_names))
    with open(path, "wb") as f:
        pickle.dump((jax.device_get((qstate, teacher_text)), info.class_names), f, protocol=5)
    print(f"calibration: {time.perf_counter() - start:.1f} s ({len(texts)} prompts, "
          f"{len(images)} images; not measured)")


def _load_calibration(mesh):
    """What `_calibrate` pickled, the arrays moved to the mesh one at a time (so that no
    second host copy of the quantized kernels adds to the peak RSS)."""
    with open(_CALIBRATION.value, "rb") as f:
        calibration, class_names = pickle.load(f)
    leaves, treedef = jax.tree.flatten(calibration)
    del calibration
    for i, leaf in enumerate(leaves):
        leaves[i] = parallel.replicate(leaf, mesh)
    return (*jax.tree.unflatten(treedef, leaves), class_names)


def _schedule(num_classes):
    return step_lib.xla_schedule(_SCHEDULE.value, num_classes=num_classes, remat=_REMAT.value)


def _measure(setting, batch_size, steps):
    """Runs one setting -> {"compile_s", "step_s", "setup_peak_gb", "step_peak_gb"}."""
    rules = SETTINGS[setting]
    phases = phases_lib.Phases()
    phases.start("set-up")
    model, params = clip.init(_MODEL.value)
    model = model.clone(text_remat=_REMAT.value)
    jax.block_until_ready(params)  # the init's temporaries are freed before the loading
    mesh = parallel.make_mesh()
    qstate, teacher_text, class_names = _load_calibration(mesh)
    prompts = prompts_lib.build(class_names, n_ctx=N_CTX, crop="crop_text" in rules,
                                context_length=model.config.text.context_length)
    frozen = parallel.replicate(step_lib.make_frozen(
        model, params, qstate, prompts, teacher_text,
        image_towers="feature_cache" not in rules, train=True), mesh)
    del params, qstate  # what the step does not read is freed, as in p4q_jax.train
    adapter = adapter_lib.QAdapter()
    embed_dim = model.config.embed_dim
    key_context, key_adapter = jax.random.split(jax.random.key(0))
    trainable = {
        "context": prompts_lib.init_context(key_context, n_ctx=N_CTX,
                                            width=model.config.text.width),
        "adapter": adapter.init(key_adapter, jnp.zeros((1, embed_dim)))["params"]}
    tx = step_lib.optimizer(step_lib.schedules(  # the official learning rates
        prompt_lr=5e-4 * batch_size / 20, adapter_lr=1e-3, total_steps=1000))
    state = parallel.replicate(step_lib.init_state(trainable, tx), mesh)
    train_step = step_lib.make_train_step(
        model=model, prompts=prompts, adapter=adapter, tx=tx, weights=step_lib.LossWeights(),
        mesh=mesh, shared_prefix="shared_prefix" in rules,
        length_buckets=LENGTH_BUCKETS if {"length_buckets", "crop_text"} <= set(rules) else 1,
        schedule=_schedule(len(class_names)))

    rng = np.random.default_rng(0)
    if "feature_cache" in rules:
        batch = {name: rng.normal(size=(batch_size, embed_dim)).astype(np.float32)
                 for name in ("student", "teacher")}
    else:
        size = model.config.vision.image_size
        batch = {"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)}
    batch["label"] = rng.integers(0, len(class_names), batch_size).astype(np.int32)
    batch = parallel.to_global(batch, mesh)

    phases.start("step")
    compile_s, step_s = host.timed(train_step, state, frozen, batch, steps)
    phases.stop()
    setup, step = (r["peak_rss_gb"] for r in phases.records)
    return {"compile_s": compile_s, "step_s": step_s,
            "setup_peak_gb": setup, "step_peak_gb": step}


def _child(*args):
    """Runs this script in a subprocess with `args` -> its stdout."""
    return subprocess.run(
        [sys.executable, __file__, f"--model={_MODEL.value}", f"--quant={_QUANT.value}",
         f"--remat={_REMAT.value}", f"--schedule={_SCHEDULE.value}",
         f"--templates={_TEMPLATES.value}", f"--dataset={_DATASET.value}", *args],
        check=True, stdout=subprocess.PIPE, text=True).stdout.strip()


def main(argv):
    del argv
    if _SETTING.value is not None:
        print(json.dumps(_measure(_SETTING.value, _BATCH.value, _STEPS.value)))
        return
    if _CALIBRATION.value is not None:
        _calibrate(_CALIBRATION.value)
        return
    num_classes = data.get_info(_DATASET.value).num_classes
    print(f"{host.describe()}, model {_MODEL.value}, {_QUANT.value}, {_DATASET.value} "
          f"({num_classes} classes), n_ctx={N_CTX}, text remat {_REMAT.value}, XLA schedule "
          f"{_schedule(num_classes)} ({_SCHEDULE.value})")
    with tempfile.TemporaryDirectory() as tmp:
        path = f"--calibration={tmp}/calibration.pkl"
        print(_child(path))
        print(f"{'setting':<17} {'batch':>5} {'compile s':>9} {'s/step':>8} {'images/s':>9} "
              f"{'set-up GB':>9} {'step peak GB':>12}", flush=True)
        for batch_size in map(int, _BATCHES.value):
            for setting in _SETTINGS.value:
                steps = _STEPS.value if setting == "all_on" else (_STEPS_OFF.value or _STEPS.value)
                r = json.loads(_child(path, f"--setting={setting}", f"--batch={batch_size}",
                                      f"--steps={steps}").splitlines()[-1])
                print(f"{setting:<17} {batch_size:>5} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} "
                      f"{batch_size / r['step_s']:>9.1f} {r['setup_peak_gb']:>9.2f} "
                      f"{r['step_peak_gb']:>12.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
