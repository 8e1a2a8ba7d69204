"""main.py across processes: a p4q job as 2 processes x 2 CPU devices (joined over 127.0.0.1)
equals the same job as 1 process x 4 devices (this test process), its export evaluates in one
process, and both processes killed after a checkpoint resume to the uninterrupted run's
parameters.

Training reads the same global batches for any number of processes (each process its slice),
calibration sees the same images and the feature cache is gathered, so the FP and PTQ rows are
equal and the first step's loss differs only by the order of the cross-process sums.
"""

import json
import signal
import subprocess
import tempfile
import time

import jax
import numpy as np
import pytest

from p4q_jax.p4q import classifier as classifier_lib

import main_runner
import multihost

TIMEOUT_S = 400
_PER_PROCESS = 2  # fake CPU devices per child: two children hold this process's four
# Synthetic images (in memory): TFDS's mock data would invent new images for each process's
# sub-split, where the real TFDS splits (e.g. the demo's shapes) are split exactly.
_FLAGS = ["--config=configs/p4q.py", "--config.data.name=synthetic",
          "--config.data.synthetic_examples=200",
          "--config.quant.calib_batches=1", "--config.quant.calib_batch_size=16",
          "--config.eval.batch_size=40", "--config.eval.text_batch_size=64",
          "--config.train.batch_size=16", "--config.train.num_steps=6",
          "--config.train.log_every=1", "--config.p4q.n_ctx=4",
          "--config.p4q.adapter_calib_batches=1", "--config.checkpoint.every_steps=2"]


def _start(argvs, *, devices):
    """Starts one main.py per argv, each logging to a file (a pipe nobody reads would fill up
    and block the process) -> [(Popen, log file)]."""
    started = []
    for argv in argvs:
        log = tempfile.TemporaryFile("w+")
        started.append((subprocess.Popen(
            main_runner.command(argv, mock_examples=None), cwd=main_runner.REPO,
            env=multihost.child_env(devices), stdout=subprocess.DEVNULL, stderr=log), log))
    return started


def _tail(log):
    log.seek(0)
    return log.read()[-3000:]


def _run_processes(argvs, *, devices):
    """Runs one main.py per argv to completion, bounded in time -> each process's log."""
    started = _start(argvs, devices=devices)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p, _ in started):
            # One failing process leaves the other waiting in a collective: fail at once.
            failed = [log for p, log in started if p.poll() not in (None, 0)]
            assert not failed, "\n".join(map(_tail, failed))
            assert time.monotonic() < deadline, "\n".join(_tail(log) for _, log in started)
            time.sleep(0.5)
        logs = []
        for _, log in started:
            log.seek(0)
            logs.append(log.read())
        return logs
    finally:
        for p, log in started:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def _two_processes(flags, workdir):
    port = multihost.free_port()
    return [[*flags, f"--workdir={workdir}",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
            for i in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    assert jax.device_count() == 2 * _PER_PROCESS  # the one-process run has both halves' devices
    root = tmp_path_factory.mktemp("multihost")
    flags = [*_FLAGS, f"--config.model.checkpoint={tiny_checkpoint}"]
    _run_processes(_two_processes(flags, root / "two"), devices=_PER_PROCESS)
    main_runner.run_job([*flags, f"--workdir={root / 'one'}"], mock_examples=None)
    return root, flags, [json.loads((root / name / "results.json").read_text())
                         for name in ("two", "one")]


def test_two_processes_equal_one_process(runs):
    root, _, (two, one) = runs
    rows_two = {r["method"]: r for r in two["rows"]}
    rows_one = {r["method"]: r for r in one["rows"]}
    # 200 test images: one is 0.5 points.
    assert list(rows_two) == ["fp_zeroshot", "ptq", "p4q"] and rows_two["p4q"]["count"] == 200
    for method in ("fp_zeroshot", "ptq"):  # the same images and calibration: the same model
        assert rows_two[method]["top1"] == rows_one[method]["top1"], method
        assert rows_two[method]["top5"] == rows_one[method]["top5"], method
    # The PTQ diagnostics reduce over the global calibration batch: the same on two processes.
    diagnosed_two, diagnosed_one = (rows["ptq"]["diagnostics"] for rows in (rows_two, rows_one))
    for tower in ("image", "text"):
        assert (diagnosed_two["cosine_to_fp"][tower]["mean"]
                == pytest.approx(diagnosed_one["cosine_to_fp"][tower]["mean"], abs=1e-5))
    assert ([s["sqnr_db"] for s in diagnosed_two["worst_sites"]]
            == pytest.approx([s["sqnr_db"] for s in diagnosed_one["worst_sites"]], abs=0.02))
    first_two, first_one = two["history"][0], one["history"][0]
    assert first_two["step"] == first_one["step"] == 1
    for term in ("cross_entropy", "distillation"):
        assert first_two[term] == pytest.approx(first_one[term], rel=1e-5), term
    assert abs(rows_two["p4q"]["top1"] - rows_one["p4q"]["top1"]) <= 2.0
    # One results.json and one export, written by process 0; the cache in per-process parts.
    assert sorted(p.name for p in (root / "two").glob("*results*.json")) == ["results.json"]
    assert sorted(p.name for p in (root / "two" / "feature_cache").iterdir()) == [
        "process_0_of_2", "process_1_of_2"]


def test_the_two_process_export_evaluates_in_one_process(runs):
    root, _, (two, _) = runs
    main_runner.run_job(["--config=configs/p4q.py", "--mode=eval", "--config.data.name=synthetic",
                         "--config.data.synthetic_examples=200", "--config.eval.batch_size=40",
                         f"--workdir={root / 'two'}"], mock_examples=None)
    (row,) = json.loads((root / "two" / "eval_results.json").read_text())["rows"]
    p4q = two["rows"][-1]
    assert (row["top1"], row["top5"], row["count"]) == (p4q["top1"], p4q["top5"], p4q["count"])


def _export_leaves(workdir):
    _, _, _, trained = classifier_lib.load(workdir / "export")
    return [np.asarray(x) for x in jax.tree.leaves(
        (trained.context, trained.adapter_params, trained.adapter_qstate))]


def test_killed_two_process_run_resumes_to_the_uninterrupted_result(tmp_path, runs):
    """SIGKILL of both processes after the first checkpoint, then the same command again:
    each process says it resumes from the killed step, the history lists every logged step
    (those before the kill restored from the checkpoint), and the export is bit-equal to
    the uninterrupted run's. (The test of main.py killed and resumed: a single process is
    this one's special case.)"""
    root, flags, _ = runs
    workdir = tmp_path / "killed"
    started = _start(_two_processes(flags, workdir), devices=_PER_PROCESS)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not main_runner.complete_checkpoint_steps(workdir / "checkpoints"):
            assert all(p.poll() is None for p, _ in started) and time.monotonic() < deadline, (
                "no checkpoint appeared:\n" + "\n".join(_tail(log) for _, log in started))
            time.sleep(0.02)
    finally:
        for p, log in started:
            p.send_signal(signal.SIGKILL)
            p.wait()
            log.close()
    killed_at = max(main_runner.complete_checkpoint_steps(workdir / "checkpoints"))
    assert killed_at < 6 and not (workdir / "results.json").exists()
    logs = _run_processes(_two_processes(flags, workdir), devices=_PER_PROCESS)
    for log in logs:
        assert f"resuming from the checkpoint at step {killed_at}" in log, log[-3000:]
    history = json.loads((workdir / "results.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 7))  # train.log_every=1
    for resumed, uninterrupted in zip(_export_leaves(workdir), _export_leaves(root / "two")):
        np.testing.assert_array_equal(resumed, uninterrupted)
