"""Base config: every field at its default, set for a zero-shot run of a random `tiny` CLIP.

Every field, its default and what it means are defined once, in `p4q_jax/schema.py`; this file
is that schema's defaults. With no checkpoint, a randomly initialised `model.name` CLIP is used
(a smoke run that says so in its output: its accuracy is chance). The job configs
(`zeroshot.py`, `ptq.py`, `p4q.py`, `default.py`, ...) load this file and change a few fields;
every field can be overridden from the command line, e.g.
`--config.data.name=cifar100 --config.model.checkpoint=ViT-B-32.pt`, and a field the schema
does not hold is refused before any work (`preflight.check`).
"""

from p4q_jax import schema


def get_config():
    return schema.defaults()
