"""Image and text encoding throughput of a CLIP (random weights; ViT-B/32 by default, or
any named config such as RN50) in float32 and bfloat16.

    python benchmarks/encode.py [--model=RN50] [--image_batch=32] [--text_batch=256]

Text is timed at the full 77-token context and cropped after the last EOT (what the
evaluator and trainer run; CLIP prompts like "a photo of a {class}." end by token ~10).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import host
from p4q_jax import clip

_MODEL = flags.DEFINE_string("model", "ViT-B/32", "Named CLIP config.")
_IMAGE_BATCH = flags.DEFINE_integer("image_batch", 32, "Images per call.")
_TEXT_BATCH = flags.DEFINE_integer("text_batch", 256, "Prompts per call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after one warm-up call.")


def _per_second(fn, items):
    jax.block_until_ready(fn())  # compile + warm up
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
        jax.block_until_ready(fn())
    return items * _REPEATS.value / (time.perf_counter() - start)


def main(argv):
    del argv
    print(f"{host.describe()}, model {_MODEL.value}")
    _, params = clip.init(_MODEL.value)
    config = clip.get_config(_MODEL.value)
    size = config.vision.image_size
    images = jnp.asarray(np.random.default_rng(0).normal(
        size=(_IMAGE_BATCH.value, size, size, 3)).astype(np.float32))
    names = [f"class number {i}" for i in range(_TEXT_BATCH.value)]
    tokens = clip.tokenize([f"a photo of a {n}." for n in names])
    cropped = clip.crop_to_eot(tokens)
    print(f"{'dtype':>9} {'images/s':>10} {'texts/s (77 tok)':>17} "
          f"{f'texts/s ({cropped.shape[1]} tok)':>17}")
    for dtype in (jnp.float32, jnp.bfloat16):
        model = clip.CLIP(config, dtype=dtype)
        img = _per_second(lambda: clip.encode_image(model, params, images), len(images))
        txt = _per_second(lambda: clip.encode_text(model, params, tokens), len(tokens))
        txt_c = _per_second(lambda: clip.encode_text(model, params, cropped), len(tokens))
        print(f"{jnp.dtype(dtype).name:>9} {img:10.1f} {txt:17.1f} {txt_c:17.1f}")


if __name__ == "__main__":
    app.run(main)
