"""Pure-function CLIP: model, tokenizer, preprocessing, checkpoint loading.

    model, params = clip.load("ViT-B-32.pt")      # or an HF directory, or an Orbax directory
    pixels = clip.preprocess(pil_image, size=224)  # float32 [H, W, 3]
    features = clip.encode_image(model, params, images)
"""

import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax.clip import storage
from p4q_jax.clip import architectures
from p4q_jax.clip import model as model_lib
from p4q_jax.clip.storage import CheckpointError
from p4q_jax.clip.storage import save
from p4q_jax.clip.architectures import CLIPConfig
from p4q_jax.clip.architectures import get_config
from p4q_jax.clip.encode import crop_to_eot
from p4q_jax.clip.encode import encode_image
from p4q_jax.clip.encode import encode_text
from p4q_jax.clip.model import CLIP
from p4q_jax.clip.tokenizer import tokenize
from p4q_jax.clip.transforms import preprocess


def _computation_dtype(dtype):
    """`dtype` (a name or a dtype) as a jnp dtype, one of `model.DTYPES`."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in model_lib.DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(model_lib.DTYPES)}")
    return jnp.dtype(name)


def load(path, *, dtype=jnp.float32, activation=None):
    """Loads a checkpoint from disk (no network) -> (model, params).

    Args:
      path: OpenAI `.pt` (TorchScript or state dict), a Hugging Face directory, or an
        Orbax directory written by `clip.save` / `python -m p4q_jax.clip.convert`.
      dtype: computation dtype (parameters stay float32): float32, bfloat16 or float16, as a
        name or a dtype.
      activation: override for OpenAI-layout files ("quick_gelu" by default).
    """
    dtype = _computation_dtype(dtype)
    config, params = storage.load_params(path, activation=activation)
    return CLIP(config, dtype=dtype), params


def init(config, *, seed=0, dtype=jnp.float32):
    """A randomly initialised model of `config` (a CLIPConfig or a name) -> (model, params)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed={seed!r}: expected an int")
    dtype = _computation_dtype(dtype)
    if isinstance(config, str):
        config = get_config(config)
    model = CLIP(config, dtype=dtype)
    size, length = config.vision.image_size, config.text.context_length
    params = jax.jit(model.init)(
        jax.random.key(seed), jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)
    )["params"]
    return model, params
