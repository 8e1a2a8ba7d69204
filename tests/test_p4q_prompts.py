"""CoOp prompt learner: layouts, equivalence with hand-written prompts, and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import quant
from p4q_jax.clip import tokenizer
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import classifier as classifier_lib

CLASSES = ["cat", "pickup truck", "aquarium fish"]


@pytest.fixture(scope="module")
def tiny():
    return clip.init("tiny", seed=4)


def _features(model, params, prompts, context, qstate=None):
    embeds = model.apply({"params": params}, prompts.tokens, method=model.embed_tokens)
    x = prompts_lib.embed(prompts, embeds, context)
    return clip.encode.apply(model, params, (x, jnp.asarray(prompts.eot)), qstate=qstate,
                             method=lambda m, a: m.encode_text_embeddings(*a))


@pytest.mark.parametrize("position, template", [
    ("end", "a photo of a {}."),
    ("middle", "a photo {} of a."),
    ("front", "{} a photo of a."),
])
def test_phrase_context_reproduces_the_hand_written_prompt(tiny, position, template):
    """Context = embeddings of "a photo of a" must give exactly CLIP's prompt features."""
    model, params = tiny
    prompts = prompts_lib.build(CLASSES, n_ctx=4, position=position)
    context = prompts_lib.context_from_phrase(model, params, "a photo of a")
    ours = _features(model, params, prompts, context)
    reference = clip.encode_text(model, params, clip.tokenize([template.format(c) for c in CLASSES]))
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_layout_decodes_to_the_template():
    prompts = prompts_lib.build(CLASSES, n_ctx=3, position="end")
    tok = tokenizer.Tokenizer()
    for row, eot in zip(prompts.tokens, prompts.eot):
        assert row[0] == tok.sot_id and row[eot] == tok.eot_id and not row[eot + 1:].any()
    assert tok.decode(prompts.tokens[1, 1:prompts.eot[1]]) == "x x x pickup truck ."
    np.testing.assert_array_equal(prompts.context_positions, [[1, 2, 3]] * 3)
    assert prompts.tokens.shape[1] == prompts.eot.max() + 1  # cropped after the last EOT


def test_class_specific_context(tiny):
    model, params = tiny
    prompts = prompts_lib.build(CLASSES, n_ctx=2)
    context = prompts_lib.init_context(jax.random.key(0), n_ctx=2, width=64, num_classes=3)
    assert context.shape == (3, 2, 64)
    embeds = model.apply({"params": params}, prompts.tokens, method=model.embed_tokens)
    x = prompts_lib.embed(prompts, embeds, context)
    np.testing.assert_array_equal(x[2, 1:3], context[2])


def test_context_learns_through_the_quantized_text_tower(tiny):
    """docs/design.md, "Straight-through quantizers and frozen weights": the prompts must
    train through the 4-bit tower (the public code's do not). Only the text tower is
    calibrated and quantized: the prompts never pass the image tower."""
    model, params = tiny
    texts = [f"a photo of a {c}." for c in CLASSES]
    text_only = quant.QConfig(name="w4a4attn8-text",
                              rules=quant.QConfig.parse("w4a4attn8").rules, towers=("text",))
    qstate = quant.calibrate(model, params, text_only, texts=texts)
    prompts = prompts_lib.build(CLASSES, n_ctx=4)
    context = prompts_lib.init_context(jax.random.key(1), n_ctx=4, width=64)
    target = jax.random.normal(jax.random.key(2), (3, model.config.embed_dim))

    def loss(ctx):
        return jnp.mean((_features(model, params, prompts, ctx, qstate) - target) ** 2)

    grad = jax.jit(jax.grad(loss))(context)  # one program, not one per operation
    assert grad.shape == context.shape and np.all(np.isfinite(grad))
    assert np.all(np.abs(grad).sum(-1) > 0)  # every context vector gets a gradient


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="position 'left' unknown"):
        prompts_lib.build(CLASSES, n_ctx=4, position="left")
    with pytest.raises(ValueError, match="n_ctx=0"):
        prompts_lib.build(CLASSES, n_ctx=0)
    with pytest.raises(ValueError, match="class name 'word word"):
        prompts_lib.build(["word " * 80], n_ctx=4)


def test_class_names_must_be_a_non_empty_list():
    """A str was iterated over its characters; an empty list failed inside max()."""
    with pytest.raises(TypeError, match=r"class_names: expected a list of class names, got "
                                        r"the str 'cat'"):
        prompts_lib.build("cat", n_ctx=4)
    with pytest.raises(ValueError, match=r"class_names: expected at least one class name"):
        prompts_lib.build([], n_ctx=4)
    with pytest.raises(TypeError, match=r"class_names\[1\]: expected a str, got 3"):
        prompts_lib.build(["cat", 3], n_ctx=4)


def test_trained_for_classes_refuses_a_str():
    trained = classifier_lib.Trained(class_names=("cat", "dog"), position="end",
                                  context=jnp.zeros((4, 64)), adapter=None, adapter_params=None,
                                  adapter_qstate=None)
    with pytest.raises(TypeError, match=r"class_names: expected a list of class names, got "
                                        r"the str 'truck'"):
        trained.for_classes("truck")
    assert trained.for_classes(["truck", "ship"]).class_names == ("truck", "ship")
