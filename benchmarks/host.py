"""The machine a benchmark runs on, for the first line of its output: XLA:CPU's speed (and its
float re-association) differs between CPU models, e.g. AVX2 and AVX-512 ones."""

import platform
import time

import jax
import numpy as np


def cpu_model():
    """The CPU's "model name" from /proc/cpuinfo; where there is none, platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe():
    """'device: <kind> x<count>, cpu: <model>'."""
    return f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, cpu: {cpu_model()}"


def timed(step, state, fixed, batch, steps):
    """Calls `step(state, fixed, batch) -> (state, metrics)` 1 + `steps` times -> (seconds of
    the first call: compile and run, median seconds of the others)."""
    seconds = []
    for _ in range(1 + steps):
        start = time.perf_counter()
        state, metrics = step(state, fixed, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
    return seconds[0], float(np.median(seconds[1:]))
