"""The p4q job's layout and phases: frozen params split over a `model` axis (a (2, 2) mesh of
the 4 test devices, from main.py's flags) give the data-parallel (4, 1) job's results, results.json
lists every phase with its wall time and peak resident memory, and the image tower waits in
host memory while the text tower trains."""

import gc
import json
import re

import jax
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import jobs
from p4q_jax import parallel
from p4q_jax import quant
from p4q_jax import train
from p4q_jax.configs import p4q as p4q_config

import main_runner

_FLAGS = ["--config=configs/p4q.py", "--config.data.name=synthetic",
          "--config.data.synthetic_examples=80", "--config.quant.calib_batches=1",
          "--config.quant.calib_batch_size=16", "--config.eval.batch_size=40",
          "--config.eval.text_batch_size=64", "--config.train.batch_size=16",
          "--config.train.num_steps=4", "--config.train.log_every=1", "--config.p4q.n_ctx=4",
          "--config.p4q.adapter_calib_batches=1"]
PHASES = ["set-up", "calibration", "zero-shot and PTQ evaluation", "feature cache", "training",
          "adapter calibration", "evaluation", "export"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    """The job on a (4, 1) mesh in this process, with the image tower's move to host memory
    forced (CPU devices have both memory kinds) and what train.train receives recorded; and
    from main.py's flags on a (2, 2) mesh."""
    root = tmp_path_factory.mktemp("lean")
    config = p4q_config.get_config()
    config.model.checkpoint = str(tiny_checkpoint)
    for flag in _FLAGS[1:]:
        key, value = flag.removeprefix("--config.").split("=")
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(value)
    seen = {}
    real_train = train.train

    def spy(config, *, params, qstate, **kwargs):
        gc.collect()
        seen["params"], seen["kernels"] = sorted(params), sorted(qstate.kernels)
        seen["host_bytes"] = sum(x.nbytes for x in jax.live_arrays()
                                 if x.sharding.memory_kind == "pinned_host")
        return real_train(config, params=params, qstate=qstate, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train", spy)
        patch.setattr(parallel, "host_memory_is_separate", lambda: True)
        out = {"data": jobs.p4q(config, root / "data"), "seen": seen}
    log = main_runner.run_job(
        [*_FLAGS, f"--config.model.checkpoint={tiny_checkpoint}", "--config.mesh.model=2",
         "--config.mesh.shard_min_size=0", f"--workdir={root / 'model'}"], mock_examples=None)
    on_device, total = map(float, re.search(
        r"frozen params: ([\d.]+) of ([\d.]+) MB on each device", log).groups())
    out["model"] = (on_device, total, json.loads((root / "model" / "results.json").read_text()))
    out["export"] = root / "data" / "export"
    return out


def test_a_model_axis_splits_the_frozen_params_and_keeps_the_results(runs):
    data = runs["data"]
    on_device, total, model = runs["model"]
    assert on_device < 0.6 * total  # (4, 2): each device holds about half
    rows_data = {r["method"]: r for r in data["rows"]}
    rows_model = {r["method"]: r for r in model["rows"]}
    assert list(rows_model) == ["fp_zeroshot", "ptq", "p4q"] and rows_model["p4q"]["count"] == 80
    for method in ("fp_zeroshot", "ptq"):  # 80 test images: one is 1.25 points
        assert abs(rows_model[method]["top1"] - rows_data[method]["top1"]) <= 1.25, method
    for term in ("cross_entropy", "distillation"):
        assert model["history"][0][term] == pytest.approx(data["history"][0][term],
                                                          rel=1e-4), term
    assert abs(rows_model["p4q"]["top1"] - rows_data["p4q"]["top1"]) <= 2.5


def test_results_list_every_phase_with_its_time_and_peak_memory(runs):
    phases = runs["data"]["phases"]
    assert [p["phase"] for p in phases] == PHASES
    for p in phases:
        assert p["seconds"] >= 0 and 0.1 < p["peak_rss_gb"] < 20, p


def test_balanced_calibration_reads_the_same_images_in_smaller_passes():
    """With the balanced search the calibration images come in passes of eval.batch_size:
    the same images in the same order as the calibration batches the public rule reads."""
    config = p4q_config.get_config()
    config.data.name = "synthetic"
    config.quant.calib_batches, config.quant.calib_batch_size = 2, 16
    config.eval.batch_size = 8
    job = jobs._Job(config)  # pylint: disable=protected-access

    def read(search_rows):
        config.quant.search_rows = search_rows
        batches, count = jobs.calibration_images(job, quant.QConfig.parse("w4a4attn8"))
        batches = [np.asarray(b) for b in batches]
        assert count == sum(len(b) for b in batches) == 32
        return batches

    passes, last = read("balanced"), read("last")
    assert [len(b) for b in passes] == [8] * 4 and [len(b) for b in last] == [16] * 2
    np.testing.assert_array_equal(np.concatenate(passes), np.concatenate(last))
    config.eval.batch_size = 24  # does not divide 16: the calibration batches as they are
    assert [len(b) for b in read("balanced")] == [16] * 2


def test_the_image_tower_waits_in_host_memory_while_the_text_tower_trains(runs):
    """Training on cached features reads no image tower: where device memory is not the
    host's (accelerators; forced in `runs`), the job hands train.train params and a state
    without it and keeps its quantized weights in host memory (`pinned_host`) meanwhile;
    evaluation and export get it back."""
    seen = runs["seen"]
    assert "visual" not in seen["params"] and "text" in seen["params"]
    assert not [name for name in seen["kernels"] if name.startswith("visual/")]
    visual_bytes = sum(x.nbytes for x in jax.tree.leaves(clip.init("tiny")[1]["visual"]))
    assert seen["host_bytes"] == visual_bytes
    assert [r["method"] for r in runs["data"]["rows"]] == ["fp_zeroshot", "ptq", "p4q"]
    assert runs["data"]["rows"][-1]["count"] == 80
    assert (runs["export"] / "towers").is_dir()
