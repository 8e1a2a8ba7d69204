"""A toy P4Q problem shared by the step tests: a tiny CLIP with a 4-bit text tower, 4 classes,
and a batch of 16 cached features whose class is readable from the teacher's text features."""

import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax import clip
from p4q_jax import evaluate
from p4q_jax import quant
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib

CLASSES = ["cat", "dog", "truck", "ship"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]
GLOBAL_BATCH = 16


def build_setup():
    """(model, prompts, adapter, frozen, trainable, global batch), the same in every process."""
    model, params = clip.init("tiny", seed=5)
    texts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    qstate, fp_text = quant.calibrate(
        model, params, quant.QConfig(name="w4a4-text", rules=quant.QConfig.parse("w4a4attn8").rules,
                                     towers=("text",)),
        texts=texts, return_text_features=True)
    prompts = prompts_lib.build(CLASSES, n_ctx=4)
    frozen = step_lib.Frozen(
        params=params, qstate=qstate,
        token_embeddings=model.apply({"params": params}, prompts.tokens, method=model.embed_tokens),
        eot=jnp.asarray(prompts.eot),
        teacher_text=evaluate.ensemble(fp_text, num_classes=len(CLASSES)),
        logit_scale=jnp.exp(params["logit_scale"]))
    adapter = adapter_lib.QAdapter()
    trainable = {
        "context": prompts_lib.init_context(jax.random.key(0), n_ctx=4, width=64),
        "adapter": adapter.init(jax.random.key(1), jnp.zeros((1, 64)))["params"],
    }
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), size=GLOBAL_BATCH)
    centers = np.asarray(frozen.teacher_text)
    teacher = centers[labels] + 0.3 * rng.normal(size=(GLOBAL_BATCH, 64)).astype(np.float32)
    batch = {"student": teacher + 0.1 * rng.normal(size=teacher.shape).astype(np.float32),
             "teacher": teacher, "label": labels.astype(np.int32)}
    return model, prompts, adapter, frozen, trainable, batch
