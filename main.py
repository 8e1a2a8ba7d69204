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
from p4q_jax import schema

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Experiment config file; fields can be overridden with --config.FIELD=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for results and checkpoints.")
_MODE = flags.DEFINE_enum("mode", None, sorted(jobs.MODES), "Overrides config.mode.")


def _parse_flags(argv):
    """absl's flag parsing, except that a `--config.FIELD` override naming a field or section
    the config schema does not hold exits with a message naming it and the known names
    nearby (ml_collections raises a bare KeyError/AttributeError for it)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        fields = [arg.removeprefix("--config.").split("=", 1)[0] for arg in argv[1:]
                  if arg.startswith("--config.")]
        unknown = [line for line in map(schema.describe_unknown, fields) if line]
        if not unknown:
            raise
        sys.exit("error: unknown config field(s):\n  " + "\n  ".join(unknown))


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
    app.run(main, flags_parser=_parse_flags)
