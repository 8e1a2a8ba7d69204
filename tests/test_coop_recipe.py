"""CoOp's optimisation recipe (`step.epoch_cosine_schedules`, the prompts' SGD with momentum
and weight decay, epochs by shots) against PyTorch's SGD and LR schedulers, driven the way
Dassl drives them (reimplemented here)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from p4q_jax import train
from p4q_jax.configs import p4q as p4q_config
from p4q_jax.p4q import step as step_lib


class _DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ConstantWarmupScheduler wrapping a successor (WARMUP_RECOUNT=True)."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


def _dassl_lrs(lr, max_epoch, warmup_epoch, cons_lr):
    """The learning rate of each epoch under Dassl's build_lr_scheduler("cosine")."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    scheduler = _DasslConstantWarmup(
        opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(max_epoch)),
        warmup_epoch, cons_lr)
    lrs = []
    for _ in range(max_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()  # Dassl: after each epoch
    return np.asarray(lrs)


@pytest.mark.parametrize("max_epoch,warmup", [(50, 1), (200, 1), (10, 3)])
def test_epoch_schedule_equals_dassls(max_epoch, warmup):
    steps_per_epoch = 3
    lrs = step_lib.epoch_cosine_schedules(prompt_lr=0.002, adapter_lr=1e-3,
                                          steps_per_epoch=steps_per_epoch, epochs=max_epoch,
                                          warmup_epochs=warmup, warmup_lr=1e-5)
    steps = np.arange(max_epoch * steps_per_epoch)
    ours = np.asarray(lrs["context"](jnp.asarray(steps)))
    expected = np.repeat(_dassl_lrs(0.002, max_epoch, warmup, 1e-5), steps_per_epoch)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-10)
    assert ours[0] == pytest.approx(1e-5) and ours[warmup * steps_per_epoch] == pytest.approx(0.002)


def test_prompt_sgd_equals_torch_sgd_with_momentum_and_weight_decay():
    rng = np.random.default_rng(0)
    init = rng.normal(size=(4, 8)).astype(np.float32)
    grads = rng.normal(size=(6, 4, 8)).astype(np.float32)
    lrs = [0.002, 0.002, 0.0019, 0.0015, 0.001, 0.0004]
    schedule = lambda step: jnp.asarray(lrs)[step]  # noqa: E731
    tx = step_lib.optimizer({"context": schedule, "adapter": optax.constant_schedule(0.0)},
                            prompt_momentum=0.9, prompt_weight_decay=5e-4)
    params = {"context": jnp.asarray(init), "adapter": None}
    state = tx.init(params)
    param = torch.nn.Parameter(torch.tensor(init))
    opt = torch.optim.SGD([param], lr=lrs[0], momentum=0.9, weight_decay=5e-4)
    for step, grad in enumerate(grads):
        updates, state = tx.update({"context": jnp.asarray(grad), "adapter": None}, state, params)
        params = optax.apply_updates(params, updates)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        param.grad = torch.tensor(grad)
        opt.step()
        np.testing.assert_allclose(np.asarray(params["context"]), param.detach().numpy(),
                                   rtol=0, atol=1e-6)
    assert np.abs(np.asarray(params["context"]) - init).max() > 1e-3  # it moved


@pytest.mark.parametrize("name,shots,expected", [
    ("coop/oxford_pets", 1, 50), ("coop/oxford_pets", 2, 100), ("coop/dtd", 4, 100),
    ("coop/eurosat", 8, 200), ("coop/ucf101", 16, 200), ("coop/imagenet", 16, 50),
    ("coop/imagenet", 1, 50)])
def test_epochs_by_shots_as_coops_scripts(name, shots, expected):
    config = p4q_config.get_config()
    config.train.epochs_from_shots = True
    config.data.name, config.data.num_shots = name, shots
    assert train.epochs(config) == expected
    config.train.epochs_from_shots = False
    assert train.epochs(config) == config.train.epochs
