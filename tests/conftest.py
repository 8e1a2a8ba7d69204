"""Test-session set-up: `DEVICES` fake CPU devices for every test, fast-compiling XLA
settings, a shared compilation cache, and a safe import order.

XLA_FLAGS and the cache settings must be set before jax is imported, so they are set
here, before anything imports jax. The subprocesses that tests start (main.py, the
multi-process runs, the notebook kernel) inherit them.
"""
import atexit
import os
import shutil
import tempfile

# XLA:CPU compiles without LLVM's optimizations and with its classic fusion emitters: the
# suite's time goes mostly to compiling many small programs once each, which these settings
# make faster (the suite's CPU time falls by a quarter), while the models run slower. They
# change how a program is compiled, not what it computes (beyond float rounding, which every
# tolerance here already allows for CPUs with other instruction sets). Jobs outside the
# tests use XLA's defaults, and calibration's searches keep them here too
# (`calibration.SEARCH_COMPILER_OPTIONS`). docs/results.md ("The test suite") has the
# measurements.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# Four fake CPU devices: the fewest on which a mesh has both a data and a model axis of
# size 2 and two processes hold two devices each (test_multiprocess.py). Every replicated
# computation runs once per device on the same two cores, so each device more costs every
# job test time (docs/results.md, "The test suite").
DEVICES = 4
_flags = os.environ.get("XLA_FLAGS", "").split()  # pytest-xdist's workers inherit them set
_flags += [f for f in (*FAST_COMPILE_FLAGS.split(),
                       f"--xla_force_host_platform_device_count={DEVICES}") if f not in _flags]
os.environ["XLA_FLAGS"] = " ".join(_flags)
# Many tests compile the same programs (each main.py run, each clip.init of ViT-B/32):
# JAX's persistent compilation cache, fresh for this session, compiles each one once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="p4q-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
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


def _random_checkpoint(tmp_path_factory, name):
    """A random-weight CLIP of the named config saved in the Orbax form, for main.py runs."""
    from p4q_jax import clip  # pylint: disable=g-import-not-at-top
    path = tmp_path_factory.mktemp("ckpt") / name
    model, params = clip.init(name, seed=1)
    clip.save(path, model.config, params)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The `tiny` ViT CLIP, random weights, in the Orbax form."""
    return _random_checkpoint(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_rn_checkpoint(tmp_path_factory):
    """The `tiny-rn` ResNet CLIP, random weights, in the Orbax form."""
    return _random_checkpoint(tmp_path_factory, "tiny-rn")
