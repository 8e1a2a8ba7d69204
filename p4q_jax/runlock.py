"""One run at a time per workdir: a lock file WORKDIR/run.lock held for the run's duration.

Two runs in one workdir would write the same checkpoints, feature cache and export under
each other. The lock is an exclusive `flock` on WORKDIR/run.lock, which names its holder
(pid, host, start time) so that a refused run can say who holds it. The kernel releases
the lock when its holder dies, however it dies; a lock file left behind by a killed run is
then stale: the next run takes it over and logs whose it was. A file that names a live
process on this host is never taken over, even where the file system does not honour
`flock`. In a multi-process run only process 0 locks (the others run in lockstep with it).
"""

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket

import jax
from absl import logging

NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


def _holder(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return {"unreadable": text[:200]}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _refusal(path, holder):
    who = ", ".join(f"{k} {v}" for k, v in sorted((holder or {}).items())) or "unknown"
    return WorkdirLockedError(
        f"{path.parent} is in use by another run ({who}; lock file {path}). Nothing was "
        "changed. Wait for that run to finish, or use another --workdir. If no such run "
        f"exists, remove {path}.")


def _acquire(path):
    """-> the open, locked file descriptor of `path`, holding this process's record."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _refusal(path, holder) from None
        try:  # the holder before us may have removed the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    holder = _holder(fd)
    if holder is not None:
        pid = holder.get("pid")
        if (holder.get("host") == socket.gethostname() and isinstance(pid, int)
                and pid != os.getpid() and _alive(pid)):
            os.close(fd)
            raise _refusal(path, holder)
        logging.warning("taking over the stale lock %s of a run that is gone (%s)", path,
                        ", ".join(f"{k} {v}" for k, v in sorted(holder.items())))
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    return fd


@contextlib.contextmanager
def held(workdir):
    """Holds WORKDIR/run.lock (process 0; creating the workdir) for the block.

    Raises WorkdirLockedError, naming the holder, when another live run holds it."""
    if jax.process_index() != 0:
        yield
        return
    path = pathlib.Path(workdir).absolute() / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: no one holds a removed file
        os.close(fd)
