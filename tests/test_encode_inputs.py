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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_non_finite_pixels_are_refused(tiny, bad, as_jax):
    """Today NaN pixels give NaN features with no error."""
    model, params = tiny
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    images[1, 4, 5, 0] = images[2, 0, 0, 2] = bad
    images = jnp.asarray(images) if as_jax else images
    with pytest.raises(ValueError, match=r"images: 2 pixel values are NaN or infinite \(in "
                                         r"images \[1, 2\]\)"):
        clip.encode_image(model, params, images)


def test_pixels_are_not_checked_inside_a_jit(tiny):
    model, params = tiny
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    traced = jax.jit(lambda x: clip.encode_image(model, params, x))(images)
    np.testing.assert_allclose(traced, clip.encode_image(model, params, images), atol=1e-5)


@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_token_rows_without_an_end_of_text_token_are_refused(tiny, as_jax):
    """Today rows without EOT are read at their largest id: different texts, same features."""
    model, params = tiny
    tokens = _tokens()
    tokens[1] = np.where(tokens[1] == 49407, 0, tokens[1])
    tokens = jnp.asarray(tokens) if as_jax else tokens
    with pytest.raises(ValueError, match=r"tokens: rows \[1\] have no end-of-text token "
                                         r"\(id 49407\)"):
        clip.encode_text(model, params, tokens)


@pytest.mark.parametrize("dtype", ["int8", jnp.int32, "float64", "complex64"])
def test_unsupported_model_dtypes_are_refused(tiny_checkpoint, dtype):
    with pytest.raises(ValueError, match=r"dtype=.*expected one of \['float32', 'bfloat16', "
                                         r"'float16'\]"):
        clip.load(tiny_checkpoint, dtype=dtype)
    with pytest.raises(ValueError, match="expected one of"):
        clip.init("tiny", dtype=dtype)


def test_supported_dtypes_by_name_or_object(tiny_checkpoint):
    assert clip.load(tiny_checkpoint, dtype="bfloat16")[0].dtype == jnp.bfloat16
    assert clip.init("tiny", dtype=jnp.float16)[0].dtype == jnp.float16


@pytest.mark.parametrize("seed", [True, "1", 1.0, None])
def test_init_seeds_that_are_not_ints_are_refused(seed):
    with pytest.raises(TypeError, match=rf"seed={seed!r}: expected an int"):
        clip.init("tiny", seed=seed)
