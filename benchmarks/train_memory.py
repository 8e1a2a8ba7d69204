"""Memory of one QAT train step beside one P4Q step (random weights), and their wall time on
the demo's tiny CLIP.

    python benchmarks/train_memory.py [--models=ViT-B/32,ViT-B/16] [--batch=32]
        [--dataset=cifar100] [--quant=w4a4attn8] [--demo_steps=5]

Memory (per model, without running a step): XLA's own account of the compiled step
(`jax.jit(step).lower(...).compile().memory_analysis()`: its arguments, outputs and
temporaries; the train state is donated, so its outputs alias its inputs) and the bytes of
what each step holds: the trainable parameters, the optimizer state and the fixed inputs.
P4Q's step is the training job's default (cached image features, the text tower through the
prompts, the adapter; `p4q.step`); QAT's is `p4q_jax.qat`'s (images through both LSQ towers
and the FP teacher's image tower, Adam(W) moments of every tower parameter and step). One
device (1-device mesh), the class names of `--dataset`, n_ctx 16, both quantized with
`--quant`, calibrated on one random image and the class prompts (the step's shapes do not
depend on the values). GB = 2^30 bytes.

Wall time (`--demo_steps` > 0): one step of each at the demo's settings (`configs/default.py`:
the shipped tiny CLIP, shapes_warm's classes, batch 128, w4a4attn8), median of the timed
steps after the first call; P4Q on cached features as the demo trains it, QAT on images.
"""


import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import host
from p4q_jax import clip
from p4q_jax import data
from p4q_jax import parallel
from p4q_jax import qat
from p4q_jax import quant
from p4q_jax.configs import default as default_config
from p4q_jax.configs import qat as qat_config
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib
from p4q_jax.p4q import teacher as teacher_lib

N_CTX = 16
GB = 2**30

_MODELS = flags.DEFINE_list("models", ["ViT-B/32", "ViT-B/16"], "Named CLIP configs.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch.")
_DATASET = flags.DEFINE_string("dataset", "cifar100", "Registry dataset of the class names.")
_QUANT = flags.DEFINE_string("quant", "w4a4attn8", "Quantization preset.")
_DEMO_STEPS = flags.DEFINE_integer("demo_steps", 5, "Timed demo steps (0: no timing).",
                                   lower_bound=0)


def _bytes(tree):
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _calibrate(model, params, class_names, quant_name):
    size = model.config.vision.image_size
    image = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
    return quant.calibrate(model, params, quant_name, images=[image],
                           texts=[f"a photo of a {n}." for n in class_names])


def _teacher(model, num_classes):
    text = jax.random.normal(jax.random.key(0), (num_classes, model.config.embed_dim))
    return teacher_lib.zeroshot(text / jnp.linalg.norm(text, axis=-1, keepdims=True))


def _config(batch, class_names):
    config = qat_config.get_config()
    config.train.batch_size, config.train.num_steps = batch, 1000
    config.p4q.n_ctx = N_CTX
    config.data.update(dict(name="synthetic", synthetic_classes=len(class_names)))
    return config


def _p4q(model, params, qstate, teacher, class_names, batch, mesh, adapter=None):
    """(jitted P4Q step, state, frozen, batch of cached features), as `p4q_jax.train` builds
    them with the feature cache; `adapter` default: the paper's QAdapter."""
    prompts = prompts_lib.build(class_names, n_ctx=N_CTX,
                                context_length=model.config.text.context_length)
    frozen = parallel.replicate(step_lib.make_frozen(model, params, qstate, prompts,
                                                     teacher.text, train=True), mesh)
    adapter = adapter or adapter_lib.QAdapter()
    key_context, key_adapter = jax.random.split(jax.random.key(0))
    embed = model.config.embed_dim
    trainable = {"context": prompts_lib.init_context(key_context, n_ctx=N_CTX,
                                                     width=model.config.text.width),
                 "adapter": adapter.init(key_adapter, jnp.zeros((1, embed)))["params"]}
    tx = step_lib.optimizer(step_lib.schedules(prompt_lr=5e-4 * batch / 20, adapter_lr=1e-3,
                                               total_steps=1000))
    state = parallel.replicate(step_lib.init_state(trainable, tx), mesh)
    step = step_lib.make_train_step(model=model, prompts=prompts, adapter=adapter, tx=tx,
                                    weights=step_lib.LossWeights(), mesh=mesh,
                                    length_buckets=4)
    rng = np.random.default_rng(0)
    inputs = {n: rng.normal(size=(batch, embed)).astype(np.float32)
              for n in ("student", "teacher")}
    inputs["label"] = rng.integers(0, len(class_names), batch).astype(np.int32)
    return step, state, frozen, parallel.to_global(inputs, mesh)


def _qat(config, model, params, qstate, teacher, class_names, batch, mesh):
    """(jitted QAT step, state, fixed, batch of images)."""
    run = qat.setup(config, model=model, params=params, qstate=qstate, teacher=teacher,
                    class_names=class_names, mesh=mesh)
    size = model.config.vision.image_size
    rng = np.random.default_rng(0)
    images = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
              "label": rng.integers(0, len(class_names), batch).astype(np.int32)}
    return run.train_step, run.state, run.fixed, parallel.to_global(images, mesh)


def _memory_row(name, step, state, fixed, batch):
    m = step.lower(state, fixed, batch).compile().memory_analysis()
    trainable, opt = _bytes(state.trainable), _bytes(state.opt_state)
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    print(f"{name:<5} {qat.num_params(state.trainable):>13,} {trainable / GB:>10.3f} "
          f"{opt / GB:>9.3f} {_bytes(fixed) / GB:>9.3f} {m.argument_size_in_bytes / GB:>8.3f} "
          f"{m.temp_size_in_bytes / GB:>8.3f} {peak / GB:>8.3f}", flush=True)


def _memory(model_name, batch, class_names, mesh):
    model, params = clip.init(model_name)
    qstate = _calibrate(model, params, class_names, _QUANT.value)
    teacher = _teacher(model, len(class_names))
    print(f"\n{model_name}, batch {batch}, {len(class_names)} classes, {_QUANT.value}")
    print(f"{'step':<5} {'trainable':>13} {'params GB':>10} {'optim GB':>9} {'fixed GB':>9} "
          f"{'args GB':>8} {'temp GB':>8} {'peak GB':>8}")
    _memory_row("p4q", *_p4q(model, params, qstate, teacher, class_names, batch, mesh))
    config = _config(batch, class_names)
    _memory_row("qat", *_qat(config, model, params, qstate, teacher, class_names, batch, mesh))


def _demo_time(steps, mesh):
    config = default_config.get_config()
    model, params = clip.load(config.model.checkpoint)
    class_names = data.info_from_config(config.data).class_names
    batch = config.train.batch_size
    qstate = _calibrate(model, params, class_names, "w4a4attn8")
    teacher = _teacher(model, len(class_names))
    qconfig = _config(batch, class_names)
    qconfig.p4q.n_ctx = config.p4q.n_ctx
    total = config.train.num_steps
    print(f"\ndemo (configs/default.py): tiny CLIP, {len(class_names)} classes, batch {batch}, "
          f"{total} steps")
    print(f"{'step':<5} {'compile s':>9} {'s/step':>8} {f'{total} steps, min':>16}")
    for name, parts in (
            ("p4q", _p4q(model, params, qstate, teacher, class_names, batch, mesh,
                         adapter_lib.QAdapter(reduction=config.p4q.adapter_reduction,
                                              ratio=config.p4q.adapter_ratio))),
            ("qat", _qat(qconfig, model, params, qstate, teacher, class_names, batch, mesh))):
        first, median = host.timed(*parts, steps)
        print(f"{name:<5} {first:>9.1f} {median:>8.4f} {total * median / 60:>16.1f}",
              flush=True)


def main(argv):
    del argv
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    class_names = data.get_info(_DATASET.value).class_names
    print(host.describe())
    for name in _MODELS.value:
        _memory(name, _BATCH.value, class_names, mesh)
    if _DEMO_STEPS.value:
        _demo_time(_DEMO_STEPS.value, mesh)


if __name__ == "__main__":
    app.run(main)
