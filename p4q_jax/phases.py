"""Wall time and peak resident memory of a job's phases, logged and kept for results.json.

A job is a sequence of phases (set-up, calibration, feature cache, training, ...); `Phases`
times each one and reads the process's peak resident set size (RSS) over it. On a CPU the
devices' buffers are host memory, so this is the job's whole footprint; on an accelerator
it is the host side only. Per-phase peaks need Linux: a phase starts by handing the memory
its predecessor freed back to the system (glibc's `malloc_trim`) and resetting the kernel's
high-water mark (`/proc/self/clear_refs`); elsewhere the peak is the process's since it
started (`ru_maxrss`) and the record says so. `peak_rss_bytes` is the process's peak since it
started, over every phase so far: a running maximum that the per-phase resets do not lower.
"""

import ctypes
import ctypes.util
import resource
import sys
import time

from absl import logging

GB = 2**30


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _trim():
    """Returns freed heap memory to the system (glibc only; a no-op elsewhere)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _reset_peak():
    """Resets the kernel's RSS high-water mark (VmHWM) -> whether it could."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(since_reset):
    if since_reset:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_process_peak = 0  # the highest high-water mark read so far, in bytes


def peak_rss_bytes():
    """The process's peak resident set size since it started, in bytes: the largest
    high-water mark read so far (before each phase resets it) and now (a running maximum
    over everything the process ran, not one job's own)."""
    global _process_peak
    try:
        now = _peak_bytes(True)
    except OSError:  # no /proc: ru_maxrss, which no phase resets
        now = 0
    _process_peak = max(_process_peak, now, _peak_bytes(False))
    return _process_peak


class Phases:
    """Sequential phases of one job: `start(name)` ends the running phase and begins the
    next; `stop()` ends the last. `records` holds one dict per finished phase: {"phase",
    "seconds", "peak_rss_gb", "peak_since": "phase" | "process start"}."""

    def __init__(self):
        self.records = []
        self._current = None

    def start(self, name):
        self.stop()
        peak_rss_bytes()  # the high-water mark of what ran before, before it is reset
        _trim()
        self._current = (name, time.perf_counter(), _reset_peak())

    def stop(self):
        if self._current is None:
            return
        name, began, per_phase = self._current
        self._current = None
        record = {"phase": name, "seconds": round(time.perf_counter() - began, 2),
                  "peak_rss_gb": round(_peak_bytes(per_phase) / GB, 3),
                  "peak_since": "phase" if per_phase else "process start"}
        self.records.append(record)
        logging.info("phase %s: %.1f s, peak RSS %.2f GB%s", name, record["seconds"],
                     record["peak_rss_gb"], "" if per_phase else " (since the process started)")
