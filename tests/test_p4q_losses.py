"""P4Q losses against torch's own implementations (the public code's exact calls)."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from p4q_jax.p4q import losses


def _logits(seed, shape=(6, 10)):
    rng = np.random.default_rng(seed)
    return rng.normal(scale=3.0, size=shape).astype(np.float32)


def test_cosine_logits_match_numpy():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(4, 8)), rng.normal(size=(5, 8))
    expected = 100.0 * (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
        txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    np.testing.assert_allclose(losses.cosine_logits(img, txt, 100.0), expected, rtol=1e-5)


def test_cross_entropy_matches_torch():
    logits, labels = _logits(1), np.array([0, 3, 9, 2, 2, 5])
    expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_distillation_matches_torch(temperature):
    s, t = _logits(2), _logits(3)
    expected = F.kl_div(F.log_softmax(torch.from_numpy(s) / temperature, -1),
                        F.softmax(torch.from_numpy(t) / temperature, -1),
                        reduction="batchmean").item() * temperature**2
    got = losses.kl_distillation(s, t, temperature=temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(losses.kl_distillation(t, t, temperature=temperature)) == pytest.approx(0, abs=1e-6)


def test_official_distillation_is_the_public_codes_call_and_gradient():
    s, t = _logits(4), _logits(5)
    s_torch = torch.from_numpy(s).requires_grad_()
    expected = F.cross_entropy(input=F.softmax(torch.from_numpy(t), -1),
                               target=F.softmax(s_torch, -1))
    expected.backward()
    value, grad = jax.value_and_grad(losses.official_distillation)(s, t)
    assert float(value) == pytest.approx(expected.item(), rel=1e-6)
    np.testing.assert_allclose(grad, s_torch.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_symmetric_contrastive_matches_torch():
    rng = np.random.default_rng(6)
    img, txt = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    labels = np.array([3, 1, 7, 3])
    i = F.normalize(torch.from_numpy(img), dim=-1)
    t = F.normalize(torch.from_numpy(txt[labels]), dim=-1)
    logits = 50.0 * i @ t.T
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    got = losses.symmetric_contrastive(img, txt, labels, 50.0)
    assert float(got) == pytest.approx(expected.item(), rel=1e-5)


def test_unknown_distillation_is_named():
    with pytest.raises(ValueError, match="distillation 'l2' unknown"):
        losses.distillation("l2", _logits(0), _logits(1))
