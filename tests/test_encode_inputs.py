"""`clip.encode_text` and `clip.encode_image` refuse inputs that give silently wrong features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip


@pytest.fixture(scope="module")
def tiny():
    return clip.init("tiny", seed=0)


def _tokens():
    return clip.tokenize(["a photo of a cat.", "a photo of a dog."])


@pytest.mark.parametrize("bad_id", [49408, 60000, -3])
@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_out_of_range_token_ids_are_refused(tiny, bad_id, as_jax):
    """Today an id >= vocab_size gives all-NaN features and a negative one another row's."""
    model, params = tiny
    tokens = _tokens()
    tokens[1, 3] = bad_id
    tokens = jnp.asarray(tokens) if as_jax else tokens
    with pytest.raises(ValueError, match=rf"tokens: ids must be in \[0, 49408\).*\[{bad_id}\]"):
        clip.encode_text(model, params, tokens)


def test_valid_tokens_still_encode_and_tracers_are_not_checked(tiny):
    model, params = tiny
    tokens = _tokens()
    eager = clip.encode_text(model, params, tokens)
    assert np.all(np.isfinite(eager))
    # Inside a jit the ids are not known: no check, no ConcretizationTypeError.
    traced = jax.jit(lambda t: clip.encode_text(model, params, t))(tokens)
    np.testing.assert_allclose(traced, eager, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_integer_pixels_are_refused_with_a_hint(tiny, dtype):
    model, params = tiny
    pixels = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype(dtype)
    with pytest.raises(ValueError, match=r"images: expected CLIP-normalized float32 .*"
                                         rf"got {np.dtype(dtype).name}.*clip\.preprocess"):
        clip.encode_image(model, params, pixels)
    with pytest.raises(ValueError, match="clip.preprocess"):
        clip.encode_image(model, params, jnp.asarray(pixels))


def test_float_images_still_encode(tiny):
    model, params = tiny
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    assert clip.encode_image(model, params, images).shape == (2, model.config.embed_dim)
