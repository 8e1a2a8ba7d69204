"""P4Q's losses, over cosine-similarity logits `logit_scale * norm(img) @ norm(txt).T`.

* `cross_entropy`: the contrastive image-to-text loss over the class prompts (the
  student's logits against the labels).
* `kl_distillation`: KL(softmax(t / T) || softmax(s / T)) * T^2, with the teacher's
  logits t (`p4q.teacher`: FP image features against the FP zero-shot ensemble, or a
  trained FP export's classifier).
* `official_distillation` (the default, `configs/p4q.py`): what the public PyTorch code
  computes, `F.cross_entropy(input=softmax(t), target=softmax(s))` = -sum_c p_s,c log_softmax(p_t)_c
  = logsumexp(p_t) - <p_s, p_t>; no temperature, gradient through the student only.
* `symmetric_contrastive`: CLIP's symmetric loss over the batch's image/class-prompt
  pairs (optional).
"""

import jax
import jax.numpy as jnp
import optax

DISTILLATIONS = ("kl", "official", "none")


def normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def cosine_logits(image_features, text_features, logit_scale):
    """[B, E] x [C, E] -> [B, C]; `logit_scale` is the multiplier (exp of CLIP's parameter)."""
    return logit_scale * normalize(image_features) @ normalize(text_features).T


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def kl_distillation(student_logits, teacher_logits, *, temperature=1.0):
    teacher = jax.nn.softmax(teacher_logits / temperature, axis=-1)
    log_ratio = (jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
                 - jax.nn.log_softmax(student_logits / temperature, axis=-1))
    return (teacher * log_ratio).sum(-1).mean() * temperature**2


def official_distillation(student_logits, teacher_logits):
    student = jax.nn.softmax(student_logits, axis=-1)
    teacher = jax.nn.softmax(teacher_logits, axis=-1)
    return -(student * jax.nn.log_softmax(teacher, axis=-1)).sum(-1).mean()


def distillation(kind, student_logits, teacher_logits, *, temperature=1.0):
    """The configured distillation term (`kind` in DISTILLATIONS)."""
    if kind == "kl":
        return kl_distillation(student_logits, teacher_logits, temperature=temperature)
    if kind == "official":
        return official_distillation(student_logits, teacher_logits)
    if kind == "none":
        return jnp.zeros(())
    raise ValueError(f"distillation {kind!r} unknown; expected one of {DISTILLATIONS}")


def symmetric_contrastive(image_features, class_text_features, labels, logit_scale):
    """CLIP's loss between each image and its class prompt's feature, both directions."""
    logits = cosine_logits(image_features, class_text_features[labels], logit_scale)
    targets = jnp.arange(logits.shape[0])
    return 0.5 * (cross_entropy(logits, targets) + cross_entropy(logits.T, targets))
