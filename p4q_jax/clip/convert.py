"""Converts a CLIP checkpoint (OpenAI .pt, Hugging Face dir) to this project's Orbax form.

    python -m p4q_jax.clip.convert ViT-B-32.pt checkpoints/vit_b32
"""

from absl import app
from absl import flags
from absl import logging

from p4q_jax.clip import storage

_ACTIVATION = flags.DEFINE_enum(
    "activation", None, ["quick_gelu", "gelu"],
    "Activation of an OpenAI-layout checkpoint (not stored in the file; default quick_gelu).")


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("usage: python -m p4q_jax.clip.convert SRC DST")
    src, dst = argv[1:]
    config, params = storage.load_params(src, activation=_ACTIVATION.value)
    storage.save(dst, config, params)
    logging.info("wrote %s (%s)", dst, config)


if __name__ == "__main__":
    app.run(main)
