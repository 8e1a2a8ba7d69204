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


def child_env(devices):
    """This environment with `devices` fake CPU devices (replacing the test session's count)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env
