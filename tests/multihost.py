"""Helpers for tests that start several JAX processes joined over 127.0.0.1 (gloo on CPU)."""

import os
import pathlib
import socket

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port():
    """A free TCP port on the loopback interface, for `jax.distributed`'s coordinator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags(devices):
    """This process's XLA_FLAGS with `devices` fake CPU devices instead of the session's."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


def child_env(devices):
    """This environment with `devices` fake CPU devices (replacing the test session's count)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env
