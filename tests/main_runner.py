"""Runs `main.py` in a child process, under `tfds.testing.mock_data` unless told not to.

ml_collections' config flags register `--config.*` overrides from sys.argv once per
process, so every run of main.py gets its own process (with the test's 8 fake devices).
"""

import hashlib
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
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


def command(argv, *, mock_examples=50):
    """main.py under mock TFDS data of `mock_examples` per split; None: main.py itself."""
    if mock_examples is None:
        return [sys.executable, str(REPO / "main.py"), *argv]
    return [sys.executable, "-c", _DRIVER, str(mock_examples), *argv]


def run_main(argv, *, mock_examples=50, with_stdout=False):
    """Runs main.py to completion -> its log (stderr), or (stdout, log) with `with_stdout`;
    fails the test if it fails."""
    done = subprocess.run(command(argv, mock_examples=mock_examples), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stdout, done.stderr) if with_stdout else done.stderr


def start_main(argv, *, mock_examples=50):
    """Starts main.py without waiting -> the Popen (output discarded)."""
    return subprocess.Popen(command(argv, mock_examples=mock_examples), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
