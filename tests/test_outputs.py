"""A run never replaces what it did not write: export paths of the user's files, of the
workdir or of another run, results of another config, a workdir another run is using."""

import json
import logging
import socket
import subprocess
import sys

import numpy as np
import pytest

from p4q_jax import checkpoint as checkpoint_lib
from p4q_jax import jobs
from p4q_jax import preflight
from p4q_jax import runlock
from p4q_jax.configs import base as base_config
from p4q_jax.configs import p4q as p4q_config
from p4q_jax.p4q import classifier as classifier_lib

import main_runner


def _p4q(export_dir=None):
    config = p4q_config.get_config()
    config.model.name = "tiny"
    config.data.name = "synthetic"
    config.train.batch_size = 16  # within the 64 synthetic training examples
    config.p4q.export_dir = None if export_dir is None else str(export_dir)
    return config


def _zeroshot(**data_fields):
    config = base_config.get_config()
    config.data.synthetic_examples = 16
    config.eval.batch_size = 8
    config.eval.text_batch_size = 16
    config.data.update(data_fields)
    return config


def _user_folder(path):
    (path / "sub").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article}")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return path


def test_export_dir_holding_the_users_files_is_refused_before_any_work(tmp_path, monkeypatch):
    folder = _user_folder(tmp_path / "mine")
    before = main_runner.tree_digest(folder)
    with pytest.raises(preflight.ConfigError) as e:
        jobs.run(_p4q(folder), tmp_path / "run", mode="p4q")
    assert f"p4q.export_dir='{folder}': exists and is not a P4Q export" in str(e.value)
    assert "move this one away" in str(e.value)
    assert main_runner.tree_digest(folder) == before
    assert not (tmp_path / "run").exists()  # refused before any work
    # "." is the current directory: here, a folder that holds the workdir.
    monkeypatch.chdir(folder)
    with pytest.raises(preflight.ConfigError, match="the workdir or a folder that holds it"):
        jobs.run(_p4q("."), "runs/x", mode="p4q")
    assert (folder / "thesis.tex").exists() and (folder / "sub" / "data.csv").exists()


@pytest.mark.parametrize("export, expected", [
    ("{w}", "the workdir or a folder that holds it"),
    ("{w}/..", "the workdir or a folder that holds it"),
    ("{w}/checkpoints", "is inside the run's {w}/checkpoints"),
    ("{w}/checkpoints/export", "is inside the run's {w}/checkpoints")])
def test_export_dir_over_the_runs_own_files_is_refused(tmp_path, export, expected):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10").mkdir(parents=True)
    before = main_runner.tree_digest(tmp_path)
    with pytest.raises(preflight.ConfigError) as e:
        jobs.run(_p4q(export.format(w=workdir)), workdir, mode="p4q")
    assert expected.format(w=workdir) in str(e.value)
    assert main_runner.tree_digest(tmp_path) == before


def _fake_export(path, writer):
    path.mkdir(parents=True)
    (path / classifier_lib.MARKER).write_text("{}")
    if writer is not None:
        (path / classifier_lib.RUN_FILE).write_text(json.dumps(writer))


def test_export_of_another_run_is_refused_its_own_may_be_rewritten(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    export = tmp_path / "shared_export"
    config = preflight.resolve_paths(_p4q(export), first)[0]
    _fake_export(export, preflight.export_writer(config, first))
    preflight.check_export(config, first)  # the same run, resumed: its own export
    with pytest.raises(checkpoint_lib.RunMismatchError) as e:
        jobs.run(_p4q(export), second, mode="p4q")
    assert f"holds the export of another run (workdir {first})" in str(e.value)
    assert "name another --config.p4q.export_dir" in str(e.value)
    assert not (second / "checkpoints").exists()
    # The same workdir with another config: another run too, its changes listed.
    changed = config.copy_and_resolve_references()
    changed.p4q.n_ctx = 8
    with pytest.raises(checkpoint_lib.RunMismatchError, match="p4q.n_ctx: 16 -> 8"):
        preflight.check_export(changed, first)
    # An export that records no writer is not taken for this run's.
    _fake_export(tmp_path / "old", None)
    with pytest.raises(checkpoint_lib.RunMismatchError, match="no fingerprint"):
        preflight.check_export(_p4q(tmp_path / "old"), first)


def test_zeroshot_rerun_with_another_config_keeps_the_results(tmp_path):
    jobs.run(_zeroshot(), tmp_path)
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(checkpoint_lib.RunMismatchError) as e:
        jobs.run(_zeroshot(synthetic_classes=5), tmp_path)
    message = str(e.value)
    assert "results.json holds the zeroshot results of a run with another config" in message
    assert "data.synthetic_classes: 10 -> 5" in message and "another --workdir" in message
    assert (tmp_path / "results.json").read_bytes() == before
    jobs.run(_zeroshot(), tmp_path)  # the same config may rerun


def test_ptq_and_eval_reruns_with_another_config_are_refused(tmp_path):
    ptq = _zeroshot()
    ptq.quant.config = "w8a8"
    (tmp_path / "results.json").write_text(json.dumps(
        {"mode": "ptq", "fingerprint": checkpoint_lib.run_fingerprint(ptq, "ptq")}))
    ptq.quant.config = "w4a4attn8"
    with pytest.raises(checkpoint_lib.RunMismatchError,
                       match="quant.config: 'w8a8' -> 'w4a4attn8'"):
        preflight.check_results(ptq, tmp_path, "ptq")
    evaluated = _p4q(tmp_path / "export")
    (tmp_path / "eval_results.json").write_text(json.dumps(
        {"mode": "eval", "fingerprint": checkpoint_lib.run_fingerprint(evaluated, "eval")}))
    preflight.check_results(evaluated, tmp_path, "eval")
    evaluated.data.name = "shapes"
    with pytest.raises(checkpoint_lib.RunMismatchError, match="data.name: 'synthetic' -> 'shapes'"):
        preflight.check_results(evaluated, tmp_path, "eval")
    evaluated.checkpoint.restart = True  # moves the old results aside, and only them
    preflight.check_results(evaluated, tmp_path, "eval")
    (kept,) = (tmp_path / "previous").iterdir()
    assert [p.name for p in kept.iterdir()] == ["eval_results.json"]
    assert (tmp_path / "results.json").exists()


def test_a_second_run_in_a_used_workdir_is_refused_naming_the_holder(tmp_path):
    with runlock.held(tmp_path):
        holder = json.loads((tmp_path / runlock.NAME).read_text())
        with pytest.raises(runlock.WorkdirLockedError) as e:
            jobs.run(_zeroshot(), tmp_path)
    assert f"pid {holder['pid']}" in str(e.value) and socket.gethostname() in str(e.value)
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / runlock.NAME).exists()  # released with the run


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (tmp_path / runlock.NAME).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    with caplog.at_level(logging.WARNING):
        jobs.run(_zeroshot(), tmp_path)
    assert "taking over the stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert (tmp_path / "results.json").exists() and not (tmp_path / runlock.NAME).exists()


def test_a_refused_run_exits_with_its_message_alone(tmp_path):
    """The process boundary is what is tested: nothing Orbax left running (its threads, its
    event loops) may print at exit after the refusal."""
    ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", every_steps=1,
                                       fingerprint={"seed": 0})
    ckpt.save(1, {"w": np.zeros(3)}, {"input_position": 1}, force=True)
    ckpt.wait()
    ckpt.close()
    done = subprocess.run(main_runner.command(
        ["--config=configs/p4q.py", "--config.model.name=tiny", "--config.data.name=synthetic",
         "--config.train.batch_size=16", f"--workdir={tmp_path}"], mock_examples=None),
        cwd=main_runner.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"error: {tmp_path}/checkpoints holds the checkpoint (step 1)" in done.stderr
    assert "Event loop is closed" not in done.stderr and "Traceback" not in done.stderr
