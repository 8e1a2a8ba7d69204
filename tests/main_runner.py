"""Runs main.py's jobs for the tests: in this process (`run_job`; `run_sweep` for
experiments/sweep.py and its jobs), or `main.py` itself in a child process (`command`) only
where the process boundary is what is tested (exit status, SIGKILL, several processes); both
under `tfds.testing.mock_data` unless told not to.

A child process costs an interpreter start, the TensorFlow/JAX imports and a reload of every
compiled program; `run_job` parses the same argv as main.py (the config file, its
`--config.*` overrides, `--workdir`, `--mode`) into a fresh set of flags and calls
`jobs.run`, as main.py does, in the test's process (with the session's fake devices).
"""

import contextlib
import hashlib
import io
import logging
import os
import pathlib
import subprocess
import sys
import unittest.mock

from absl import flags
from ml_collections import config_flags
import tensorflow_datasets as tfds

from p4q_jax import checkpoint
from p4q_jax import jobs
from p4q_jax import preflight
from p4q_jax import runlock

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # for `import sweep`
_DRIVER = """
import sys
import tensorflow_datasets as tfds
from absl import app
import main
num_examples = int(sys.argv[1])
sys.argv = ["main.py", *sys.argv[2:]]
with tfds.testing.mock_data(num_examples=num_examples):
    app.run(main.main)
"""


def parse(argv):
    """main.py's flags from `argv` (main.py's arguments, paths relative to the repository
    root) -> (config, workdir, mode), the values main.py hands to `jobs.run`."""
    argv = ["main.py", *argv]
    values = flags.FlagValues()  # not absl's global flags: each call defines its overrides
    config = config_flags.DEFINE_config_file(
        "config", str(REPO / "configs" / "default.py"), "", flag_values=values,
        lock_config=True, sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", "workdir", "", flag_values=values)
    mode = flags.DEFINE_enum("mode", None, sorted(jobs.MODES), "", flag_values=values)
    with _in_repo():
        values(argv)
        return config.value, workdir.value, mode.value


@contextlib.contextmanager
def _in_repo():
    """The repository root as the working directory (main.py's, in `command`), then back."""
    before = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(before)


class _Log(logging.Handler):
    """Keeps absl's log records (INFO and above) as main.py's stderr would show them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _captured(mock_examples, *, in_repo=True):
    """stdout and absl's log captured, the repository root as working directory (unless not
    `in_repo`) and mock TFDS data of `mock_examples` per split (None: none)
    -> (stdout, log handler)."""
    absl_logger = logging.getLogger("absl")
    handler, level = _Log(), absl_logger.level
    stdout = io.StringIO()
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.INFO)
    try:
        with contextlib.ExitStack() as stack:
            if in_repo:
                stack.enter_context(_in_repo())
            stack.enter_context(contextlib.redirect_stdout(stdout))
            if mock_examples is not None:
                stack.enter_context(tfds.testing.mock_data(num_examples=mock_examples))
            yield stdout, handler
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)


def run_job(argv, *, mock_examples=50, with_stdout=False):
    """main.py's job for `argv`, run in this process as `command` runs it in a child: the
    same flags, working directory and mock data -> its log (absl's INFO and above), or
    (stdout, log) with `with_stdout`. Errors propagate (main.py turns the refusals in
    `REFUSALS` into exit status 1)."""
    config, workdir, mode = parse(argv)
    with _captured(mock_examples) as (stdout, log):
        jobs.run(config, workdir, mode=mode)
    log = "\n".join(log.lines)
    return (stdout.getvalue(), log) if with_stdout else log


# What main.py reports as `error: MESSAGE` with exit status 1 (found before any work).
REFUSALS = (preflight.ConfigError, checkpoint.RunMismatchError, runlock.WorkdirLockedError)


def call_main(command, *, stdout, **_):
    """A stand-in for `subprocess.call` of a main.py command line (experiments/sweep.py's):
    the job runs in this process (`run_job`, no mock data) -> main.py's exit status, 0 or 1
    for a refusal, with its log and `error: MESSAGE` line written to `stdout`."""
    assert pathlib.Path(command[1]) == REPO / "main.py", command
    try:
        log = run_job(command[2:], mock_examples=None)
    except REFUSALS as e:
        stdout.write(f"error: {e}\n")
        return 1
    stdout.write(log + "\n")
    return 0


def run_sweep(argv):
    """experiments/sweep.py with `argv`, in this process and its working directory, each grid
    point's main.py run by `call_main` -> a CompletedProcess (its exit status, stdout, and its
    log as stderr), as a run of the script would give."""
    import sweep  # pylint: disable=g-import-not-at-top  (experiments/, on sys.path above)
    level = logging.getLogger("absl").level  # parsing absl's flags sets it (--verbosity)
    flags.FLAGS.unparse_flags()
    try:
        remaining = flags.FLAGS(["sweep.py", *argv])
        with _captured(None, in_repo=False) as (stdout, log), \
                unittest.mock.patch.object(sweep.subprocess, "call", call_main):
            code = sweep.main(remaining)
    finally:
        flags.FLAGS.unparse_flags()
        logging.getLogger("absl").setLevel(level)
    return subprocess.CompletedProcess(["sweep.py", *argv], code, stdout.getvalue(),
                                       "\n".join(log.lines))


def command(argv, *, mock_examples=50):
    """main.py under mock TFDS data of `mock_examples` per split; None: main.py itself."""
    if mock_examples is None:
        return [sys.executable, str(REPO / "main.py"), *argv]
    return [sys.executable, "-c", _DRIVER, str(mock_examples), *argv]


def relative(path):
    """`path` relative to the repository root, where main.py runs (as a user's paths are)."""
    return os.path.relpath(path, REPO)


def tree_digest(directory):
    """A hash of every name and byte under `directory`: equal digests, untouched tree."""
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(directory).rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def complete_checkpoint_steps(directory):
    """Steps with a finished checkpoint (Orbax renames a step's directory when complete)."""
    directory = pathlib.Path(directory)
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
