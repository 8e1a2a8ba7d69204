"""One site's OMSE search (`quant.observers`), compiled as calibration compiles it and at the
process's own XLA optimization level: first call (compile and run) and median run.

    python benchmarks/omse_search.py [--elements=262144] [--channels=256] [--rounds=7]
    XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false" \
        python benchmarks/omse_search.py   # the test suite's XLA settings

The input is N(0, 1) activations [1, elements / channels, channels] at a 4-bit per-tensor
asymmetric site (the `w4a4attn8` preset's linear inputs). The first row is how
`quant.calibrate` compiles every site's search (`calibration.SEARCH_COMPILER_OPTIONS`); the
second is the same program at the level XLA_FLAGS sets, which the search had before. Both
should print the same scale.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import host
from p4q_jax.quant import calibration
from p4q_jax.quant import observers
from p4q_jax.quant import qconfig

_ELEMENTS = flags.DEFINE_integer("elements", observers.SEARCH_MAX_ELEMENTS, "Searched elements.")
_CHANNELS = flags.DEFINE_integer("channels", 256, "Elements per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed calls after the first.")


def _timed(fn, *args):
    seconds = []
    for _ in range(1 + _ROUNDS.value):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return out, seconds[0], float(np.median(seconds[1:]))


def main(argv):
    del argv
    print(host.describe())
    spec = qconfig.QConfig.parse("w4a4attn8").spec("input",
                                                   "visual/transformer/resblocks_0/mlp/c_fc")
    rows = _ELEMENTS.value // _CHANNELS.value
    x = jnp.asarray(np.random.RandomState(0).randn(1, rows, _CHANNELS.value), jnp.float32)
    stats = observers.batch_stats(spec, x)
    search = lambda s, a: observers.qparams_from_search_input(spec, s, a)
    print(f"OMSE over {observers.OMSE_RATIOS} ratios on {rows * _CHANNELS.value} elements")
    print("| compiled with | first call (s) | run (s) | scale |")
    print("|---|---|---|---|")
    for name, options in (("calibration.SEARCH_COMPILER_OPTIONS",
                           calibration.SEARCH_COMPILER_OPTIONS),
                          ("the process's XLA_FLAGS", None)):
        (scale, _), first, run = _timed(jax.jit(search, compiler_options=options), stats, x)
        print(f"| {name} | {first:.3f} | {run:.4f} | {float(scale.ravel()[0]):.6f} |")


if __name__ == "__main__":
    app.run(main)
