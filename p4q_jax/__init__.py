"""p4q-jax: P4Q (learning to prompt for quantization in CLIP) in JAX/Flax."""
