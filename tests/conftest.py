"""Test-session set-up: 8 fake CPU devices for every test, and a safe import order.

XLA_FLAGS must be set before jax initialises its backends, so it is set here, before
anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# torchvision 0.29.1 segfaults while loading its native ops if tensorflow-cpu 2.21 was
# imported first (the other order works). open_clip imports torchvision, so load it
# before any test module pulls in tensorflow. torch is a test-only dependency.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight `tiny` CLIP saved in the Orbax form, for main.py runs."""
    from p4q_jax import clip  # pylint: disable=g-import-not-at-top
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model, params = clip.init("tiny", seed=1)
    clip.save(path, model.config, params)
    return path
