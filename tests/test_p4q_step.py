"""P4Q train step: 1 device vs 8 (same global batch), no recompilation, learning on a toy task
(the loss falls; held-out accuracy rises above PTQ's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import evaluate
from p4q_jax import parallel
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import losses
from p4q_jax.p4q import step as step_lib

import toy_p4q


@pytest.fixture(scope="module")
def setup():
    return toy_p4q.build_setup()


# The loss test's run, to the end of the schedule. Every _run shares that schedule (the first
# step's learning rate is its peak), so the one-step tests compile the same program.
_STEPS = 400


def _run(setup, mesh, steps, frozen_shardings=None):
    model, prompts, adapter, frozen, trainable, batch = setup
    tx = step_lib.optimizer(step_lib.schedules(prompt_lr=0.5, adapter_lr=1e-2,
                                               total_steps=_STEPS))
    train_step = step_lib.make_train_step(model=model, prompts=prompts, adapter=adapter, tx=tx,
                                          weights=step_lib.LossWeights(), mesh=mesh,
                                          frozen_shardings=frozen_shardings)
    state = parallel.replicate(step_lib.init_state(jax.tree.map(jnp.array, trainable), tx), mesh)
    frozen = jax.device_put(frozen, frozen_shardings or parallel.replicated(mesh))
    history = []
    for _ in range(steps):
        state, metrics = train_step(state, frozen, parallel.to_global(batch, mesh))
        history.append(jax.tree.map(float, metrics))
    return state, history, train_step


@pytest.fixture(scope="module")
def one_device_step(setup):
    """(state, metrics) of one step on one device: the reference of both sharded steps."""
    state, (metrics,), _ = _run(setup, parallel.make_mesh(devices=jax.devices()[:1]), 1)
    return state, metrics


def test_one_device_and_all_devices_agree(setup, one_device_step):
    """One step on the same global batch, on one device and data-parallel over the session's
    four. (Over many steps the two drift apart a little: summation order differs, and AdamW's
    first steps and the 4-bit roundings amplify it.)"""
    every = parallel.make_mesh()
    assert every.shape["data"] == jax.device_count() == 4
    s1, h1 = one_device_step
    s4, (h4,), _ = _run(setup, every, 1)
    for name in h1:
        assert h1[name] == pytest.approx(h4[name], abs=1e-5), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 s1.trainable, s4.trainable)


def test_model_axis_shards_the_frozen_kernels_with_the_same_step(setup, one_device_step):
    """A (data 2, model 2) mesh with the text tower's kernels split over `model`."""
    mesh = parallel.make_mesh(data=2, model=2)
    shardings = parallel.weight_shardings(setup[3], mesh, min_size=0)
    split = [s for s in jax.tree.leaves(shardings) if s.spec == jax.sharding.PartitionSpec(
        None, parallel.MODEL)]
    assert len(split) >= 8  # every 2-D kernel of the tiny text tower
    s1, h1 = one_device_step
    s2, (h2,), _ = _run(setup, mesh, 1, frozen_shardings=shardings)
    for name in h1:
        assert h1[name] == pytest.approx(h2[name], abs=1e-5), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 s1.trainable, s2.trainable)


def test_loss_falls_without_recompiling(setup):
    """Trained to the end of its schedule, the loss settles near this toy's floor (about half
    the first loss: the KL term holds the student near the nearly uniform teacher). Measured on
    an AMD EPYC: 0.46-0.55 of the first loss over 1 and 8 devices, perturbed initial contexts and
    XLA:CPU ISAs (SSE4.2, AVX, AVX2, fast math), 0.41-0.58 with other toy batches; 1.0 with
    learning rate 0. Mid-schedule the 4-bit roundings make it swing with the CPU's float
    re-association (after 30 steps: 0.65-0.85 here, 0.72 on an AVX-512 Xeon). Trained on one
    device (the ranges above cover 1 and 8; `test_one_device_and_all_devices_agree` holds
    one and four to one step): 400 steps without the fake devices' collectives."""
    state, history, train_step = _run(setup, parallel.make_mesh(devices=jax.devices()[:1]),
                                      _STEPS)
    ratio = history[-1]["loss"] / history[0]["loss"]
    assert ratio < 0.7, ratio
    assert int(state.step) == _STEPS
    assert train_step._cache_size() == 1  # one compilation for all the steps
    _, _, _, _, trainable, _ = setup
    moved = np.abs(np.asarray(state.trainable["context"]) - np.asarray(trainable["context"]))
    assert moved.min() > 0  # every context entry learned through the 4-bit text tower


def _toy_features(frozen, n, seed, noise=0.01):
    """n cached-feature examples around the FP class text features (the teacher's classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(toy_p4q.CLASSES), size=n).astype(np.int32)
    teacher = np.asarray(frozen.teacher_text)[labels] + noise * rng.normal(size=(n, 64))
    student = teacher + noise * rng.normal(size=teacher.shape)
    return {"student": student.astype(np.float32), "teacher": teacher.astype(np.float32),
            "label": labels}


def test_accuracy_rises_above_ptq_on_held_out_features(setup):
    """Trained on 256 examples, tested on 256 others: the PTQ zero-shot classifier (the 4-bit
    text tower's template ensemble) against the trained prompts + adapter (frozen 8-bit).

    The examples sit 0.01 around the FP class text features, so the FP classifier scores 100%.
    Those features are almost parallel (cosine 0.97-0.995): where PTQ's 4-bit roundings leave
    the classes depends on float re-association (28-84% over 64 calibrations under XLA:CPU
    flags and 1e-5 perturbations of the weights), so P4Q is held to FP's accuracy, not to a
    lead over PTQ. Trained to the end of its schedule it scored 98.8-100% in 21 runs (1 and 8
    devices, perturbed initial contexts, XLA:CPU ISAs); 47% with learning rate 0, 71-82% with
    the adapter frozen. Trained on one device: 900 steps without the fake devices' collectives,
    within those measured runs."""
    model, prompts, adapter, frozen, trainable, _ = setup
    test = _toy_features(frozen, 256, seed=1)
    texts = [t.format(c) for c in toy_p4q.CLASSES for t in toy_p4q.TEMPLATES]
    ptq_text = evaluate.ensemble(clip.encode_text(model, frozen.params, clip.tokenize(texts),
                                                  qstate=frozen.qstate),
                                 num_classes=len(toy_p4q.CLASSES))
    ptq = np.mean(np.argmax(test["student"] @ ptq_text.T, -1) == test["label"])
    fp = np.mean(np.argmax(test["student"] @ np.asarray(frozen.teacher_text).T, -1)
                 == test["label"])

    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    steps = 900
    tx = step_lib.optimizer(step_lib.schedules(prompt_lr=0.01, adapter_lr=1e-2,
                                               total_steps=steps))
    train_step = step_lib.make_train_step(model=model, prompts=prompts, adapter=adapter, tx=tx,
                                          weights=step_lib.LossWeights(), mesh=mesh)
    state = parallel.replicate(step_lib.init_state(jax.tree.map(jnp.array, trainable), tx), mesh)
    train = parallel.to_global(_toy_features(frozen, 256, seed=2), mesh)
    placed = parallel.replicate(frozen, mesh)
    for _ in range(steps):
        state, metrics = train_step(state, placed, train)
        jax.block_until_ready(metrics)  # see train.py: bounded steps in flight
    learned = jax.device_get(state.trainable)
    adapter_qstate = adapter_lib.calibrate(adapter, learned["adapter"], [train["student"]])
    text = step_lib.class_text_features(model, frozen, prompts, learned["context"])
    adapted = adapter_lib.apply(adapter, learned["adapter"], test["student"], adapter_qstate)
    p4q = np.mean(np.argmax(losses.cosine_logits(adapted, text, 1.0), -1) == test["label"])
    assert p4q >= fp - 0.1 and p4q > ptq, (p4q, fp, ptq)
