"""Atomic writes: a file or a directory appears whole under its name, or not at all.

Everything the project writes (result files, plots, checkpoint trees, the feature cache,
exports) goes through here: the content is written under a temporary name beside the
target (`.NAME.tmp-XXXX`), flushed to disk, then renamed over the target in one step. A
process killed mid-write leaves only a temporary, which the next write of the same target
removes (`clean_leftovers`), never a half-written target. A replaced directory is first
renamed aside (`.NAME.old-XXXX`) and removed only once the new one is in place; a kill
between the two renames is repaired by the next write, which brings the old one back.
"""

import contextlib
import os
import pathlib
import shutil
import tempfile

_TMP = ".tmp-"
_OLD = ".old-"


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(path):
    """Removes the temporaries of killed writes of `path`; restores a directory that a kill
    left renamed aside (the target missing, its `.old-` copy present). -> paths removed."""
    path = pathlib.Path(path).absolute()
    if not path.parent.is_dir():
        return []
    removed = []
    olds = sorted(path.parent.glob(f".{path.name}{_OLD}*"))
    if olds and not path.exists():
        os.replace(olds.pop(), path)
    for leftover in [*path.parent.glob(f".{path.name}{_TMP}*"), *olds]:
        _remove(leftover)
        removed.append(leftover)
    return removed


@contextlib.contextmanager
def file(path, *, suffix=""):
    """Yields a temporary file name beside `path`; when the block succeeds, the file is
    flushed and renamed to `path` (replacing it), otherwise removed."""
    path = pathlib.Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text):
    """Writes a text file atomically."""
    with file(path) as tmp:
        tmp.write_text(text)


def write_bytes(path, data):
    """Writes a binary file atomically."""
    with file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def directory(path, *, replace=False):
    """Yields an empty temporary directory beside `path` that becomes `path` when the block
    succeeds (removed otherwise).

    Args:
      path: the directory to create.
      replace: whether an existing `path` is replaced; it is kept until the new one is in
        place. Without it an existing `path` is an error (nothing is overwritten).
    """
    path = pathlib.Path(path).absolute()
    clean_leftovers(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP}", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}{_OLD}", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            _remove(old)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
