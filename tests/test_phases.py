"""Per-phase wall time and peak resident memory (`p4q_jax.phases`)."""

import sys
import time

import numpy as np
import pytest

from p4q_jax import phases as phases_lib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-phase peaks need Linux")
def test_each_phase_has_its_own_peak_and_time():
    phases = phases_lib.Phases()
    phases.start("allocates")
    block = np.ones(400 * 2**20 // 8)  # 400 MB, touched
    del block
    phases.start("sleeps")
    time.sleep(0.2)
    phases.stop()
    phases.stop()  # nothing running: no second record
    allocates, sleeps = phases.records
    assert [allocates["phase"], sleeps["phase"]] == ["allocates", "sleeps"]
    assert allocates["peak_since"] == sleeps["peak_since"] == "phase"
    # The first phase's peak holds the 400 MB block; the second starts after it was freed.
    assert allocates["peak_rss_gb"] - sleeps["peak_rss_gb"] > 0.3
    assert sleeps["seconds"] >= 0.2
