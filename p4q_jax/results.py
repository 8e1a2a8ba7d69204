"""Result files: written by process 0 only, to a temporary name and then renamed."""

import json
import os
import pathlib
import tempfile

import jax


def write_json(path, obj):
    """Atomically writes `obj` as JSON (process 0 only; others return immediately)."""
    if jax.process_index() != 0:
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
