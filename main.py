"""Entry point: `python main.py --config=configs/NAME.py --workdir=DIR [--mode=MODE]`.

Only parses flags; the jobs live in `p4q_jax.jobs` so they can be scripted from Colab.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from p4q_jax import checkpoint
from p4q_jax import jobs
from p4q_jax import preflight
from p4q_jax import runlock

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Experiment config file; fields can be overridden with --config.FIELD=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for results and checkpoints.")
_MODE = flags.DEFINE_enum("mode", None, sorted(jobs.MODES), "Overrides config.mode.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    jobs.initialize_distributed(_CONFIG.value)
    try:
        jobs.run(_CONFIG.value, _WORKDIR.value, mode=_MODE.value)
    except (preflight.ConfigError, checkpoint.RunMismatchError,
            runlock.WorkdirLockedError) as e:
        sys.exit(f"error: {e}")  # found before any work: the message says it all


if __name__ == "__main__":
    app.run(main)
