"""P4Q: prompt learning and a low-bit adapter on a frozen PTQ CLIP, distilled from FP CLIP."""

from p4q_jax.p4q import adapter
from p4q_jax.p4q import classifier
from p4q_jax.p4q import features
from p4q_jax.p4q import losses
from p4q_jax.p4q import prompts
from p4q_jax.p4q import step
