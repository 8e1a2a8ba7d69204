"""The public code's recipe (`configs/cifar100_vitb32_official448.py`): its staged learning
rates against a hand-computed table and against PyTorch's optimizers rebuilt per stage, driven
the way its scripts/train_p4q.sh and DQ_QACoOp.fit drive them (reimplemented here), and the
optimizer state reset exactly at the stage boundaries."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from p4q_jax import preflight
from p4q_jax.configs import cifar100_vitb32_official448 as official_config
from p4q_jax.configs import cifar100_vitb32_w4a4attn8 as w4_config
from p4q_jax.p4q import step as step_lib

P = 5e-4 * 128 / 20  # the public prompt lr at batch 128
A = 1e-3


def _lrs(schedules, steps):
    n = jnp.arange(steps)
    return np.asarray(schedules["context"](n)), np.asarray(schedules["adapter"](n))


def test_stage_learning_rates_equal_a_hand_computed_table():
    """Stages ending at epochs 1 and 3, one step per epoch. Stage 2 (a run with
    --coop_epochs 3 --resume_checkpoint 1) trains global steps 1 and 2: the prompts' cosine
    spans 3 steps and is indexed by the global step (cos(pi/3) = 1/2, cos(2 pi/3) = -1/2);
    the adapter's restarts at its peak."""
    final = P * 1e-3
    ends = step_lib.stage_ends((1, 3), steps_per_epoch=1, total_steps=3)
    assert ends == (1, 3)
    prompt, adapter = _lrs(step_lib.official_stage_schedules(
        prompt_lr=P, adapter_lr=A, stage_ends=ends), 3)
    np.testing.assert_allclose(prompt, [P, final + 0.75 * (P - final),
                                        final + 0.25 * (P - final)], rtol=1e-6)
    np.testing.assert_allclose(prompt, [3.2e-3, 2.4008e-3, 8.024e-4], rtol=1e-6)
    np.testing.assert_allclose(adapter, [1e-3, 1e-3, 7.5e-4], rtol=1e-6)


def _build_cosine_lrs(lr, total_step):
    """models/utils.py's build_cosine_scheduler(lr=lr, total_step): no warm-up, to lr x 1e-3."""
    final = lr * 1e-3
    steps = np.arange(total_step)
    return final + 0.5 * (lr - final) * (1 + np.cos(np.pi * steps / len(steps)))


def _public_staged_run(ctx, w, grads, *, stage_epochs, steps_per_epoch):
    """train_p4q.sh's stages as DQ_QACoOp.fit runs them, in torch: per stage a new SGD
    (wd 0) and AdamW (eps 1e-4) from the resumed weights, the prompt lr set from the stage's
    cosine at the global iteration before each step, the adapter's CosineAnnealingLR stepped
    after each step. Returns per step (prompt lr, adapter lr, ctx, w)."""
    ctx = torch.nn.Parameter(torch.tensor(ctx))
    w = torch.nn.Parameter(torch.tensor(w))
    out, resume = [], 0
    for epochs in stage_epochs:
        total = epochs * steps_per_epoch
        sgd = torch.optim.SGD([ctx], lr=P, weight_decay=0.0)
        lrs = _build_cosine_lrs(P, total)
        adamw = torch.optim.AdamW([w], lr=A, eps=1e-4)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adamw, total)
        for g in range(resume * steps_per_epoch, total):
            for group in sgd.param_groups:
                group["lr"] = lrs[g]
            adapter_lr = adamw.param_groups[0]["lr"]
            ctx.grad, w.grad = torch.tensor(grads["context"][g]), torch.tensor(grads["w"][g])
            sgd.step()
            adamw.step()
            cosine.step()
            out.append((lrs[g], adapter_lr, ctx.detach().numpy().copy(),
                        w.detach().numpy().copy()))
        resume = epochs
    return out


@pytest.mark.parametrize("reset", [True, False])
def test_staged_run_equals_torch_optimizers_rebuilt_per_stage(reset):
    stage_epochs, steps_per_epoch = (1, 2, 4), 3
    total = stage_epochs[-1] * steps_per_epoch
    rng = np.random.default_rng(0)
    ctx0 = rng.normal(size=(4, 8)).astype(np.float32)
    w0 = rng.normal(size=(3, 5)).astype(np.float32)
    grads = {"context": rng.normal(size=(total, 4, 8)).astype(np.float32),
             # varying scales, so that stale Adam moments would show
             "w": (rng.normal(size=(total, 3, 5)) * np.linspace(0.1, 3, total)[:, None, None]
                   ).astype(np.float32)}
    expected = _public_staged_run(ctx0, w0, grads, stage_epochs=stage_epochs,
                                  steps_per_epoch=steps_per_epoch)

    ends = step_lib.stage_ends(stage_epochs, steps_per_epoch=steps_per_epoch,
                               total_steps=total)
    schedules = step_lib.official_stage_schedules(prompt_lr=P, adapter_lr=A, stage_ends=ends)
    tx = step_lib.optimizer(schedules, adapter_eps=1e-4, reset_steps=ends[:-1] if reset else ())
    params = {"context": jnp.asarray(ctx0), "adapter": {"w": jnp.asarray(w0)}}
    state = tx.init(params)
    ctx_err = w_err = 0.0
    for g, (prompt_lr, adapter_lr, ctx, w) in enumerate(expected):
        assert float(schedules["context"](g)) == pytest.approx(prompt_lr, rel=1e-5)
        assert float(schedules["adapter"](g)) == pytest.approx(adapter_lr, rel=1e-5, abs=1e-12)
        updates, state = tx.update({"context": jnp.asarray(grads["context"][g]),
                                    "adapter": {"w": jnp.asarray(grads["w"][g])}}, state, params)
        params = optax.apply_updates(params, updates)
        ctx_err = max(ctx_err, np.abs(np.asarray(params["context"]) - ctx).max())
        w_err = max(w_err, np.abs(np.asarray(params["adapter"]["w"]) - w).max())
    assert ctx_err < 1e-6  # the prompts' SGD has no state to reset
    if reset:
        assert w_err < 1e-6
    else:  # Adam's moments and step count carried over the boundaries: another run
        assert w_err > 1e-4


def test_reset_at_restarts_the_inner_state_exactly_at_the_boundaries():
    b1 = 0.9
    tx = step_lib.reset_at(optax.scale_by_adam(b1=b1), steps=(2, 5))
    grads = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    state = tx.init(jnp.zeros(3))
    start = 0
    for n, g in enumerate(grads):
        _, state = tx.update(jnp.asarray(g), state)
        if n in (2, 5):
            start = n
        # Adam's first moment since the last reset: sum_j (1 - b1) b1^(n - j) g_j.
        mu = sum((1 - b1) * b1 ** (n - j) * grads[j] for j in range(start, n + 1))
        adam = state.inner
        np.testing.assert_allclose(np.asarray(adam.mu), mu, rtol=1e-5, atol=1e-7)
        assert int(adam.count) == n - start + 1, n
        assert int(state.count) == n + 1


def test_stage_ends_name_the_field_when_wrong():
    assert step_lib.stage_ends((1, 5, 10, 20, 50, 100), steps_per_epoch=390,
                               total_steps=39_000) == (390, 1950, 3900, 7800, 19_500, 39_000)
    with pytest.raises(ValueError, match=r"train.stage_epochs=\(1, 5\) ends at epoch 5"):
        step_lib.stage_ends((1, 5), steps_per_epoch=2, total_steps=12)
    for bad in [(), (5, 1), (0, 3), (2, 2)]:
        with pytest.raises(ValueError, match="expected increasing positive epoch counts"):
            step_lib.stage_ends(bad, steps_per_epoch=1, total_steps=3)


def test_official_config_is_the_public_recipe():
    config = official_config.get_config()
    assert config.quant.config == "official"
    assert (config.quant.calib_batches, config.quant.calib_batch_size) == (10, 128)
    assert config.loss.distillation_kind == "official"
    assert (config.loss.cross_entropy, config.loss.distillation) == (1.0, 1.0)
    assert config.train.schedule == "official_stages"
    assert tuple(config.train.stage_epochs) == (1, 5, 10, 20, 50, 100)
    assert config.train.epochs == 100 and config.train.batch_size == 128
    assert config.train.prompt_lr is None and config.train.prompt_momentum == 0.0
    assert (config.train.adapter_lr, config.train.adapter_eps,
            config.train.adapter_weight_decay) == (1e-3, 1e-4, 0.01)
    assert (config.p4q.n_ctx, config.p4q.position, config.p4q.adapter_reduction,
            config.p4q.adapter_ratio) == (16, "end", 4, 0.2)
    assert config.data.num_shots == 0 and config.data.flip
    assert w4_config.get_config().quant.config == "w4a4attn8"


def test_preflight_checks_the_stages(tmp_path):
    config = official_config.get_config()
    config.data.name = "synthetic"
    config.train.stage_epochs = (1, 5, 10)
    with pytest.raises(preflight.ConfigError, match=r"train.stage_epochs=\(1, 5, 10\): the "
                       r"last stage must end at train.epochs=100"):
        preflight.check(config, tmp_path, mode="p4q")
    config.train.stage_epochs = (5, 1, 100)
    with pytest.raises(preflight.ConfigError, match="expected increasing positive epoch"):
        preflight.check(config, tmp_path, mode="p4q")

