"""The machine a benchmark runs on, for the first line of its output: XLA:CPU's speed (and its
float re-association) differs between CPU models, e.g. AVX2 and AVX-512 ones."""

import platform

import jax


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
