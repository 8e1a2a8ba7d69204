"""The training checkpointer never loses a run: another run's checkpoints are refused
untouched, an unreadable one is moved aside (never deleted), restart keeps the old run."""

import logging
import os

import numpy as np
import pytest

from p4q_jax import checkpoint as checkpoint_lib
from p4q_jax.configs import p4q as p4q_config

import main_runner


def _saved(directory, fingerprint, steps=(1, 2)):
    ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=3, fingerprint=fingerprint)
    for step in steps:
        ckpt.save(step, {"w": np.full(3, float(step))}, {"input_position": step})
    ckpt.wait()
    ckpt.close()


def test_fingerprint_lists_what_shapes_the_run_and_not_where_files_go():
    config = p4q_config.get_config()
    fields = checkpoint_lib.run_fingerprint(config)
    assert {"seed", "p4q.adapter", "p4q.n_ctx", "quant.config", "train.batch_size",
            "loss.distillation_kind", "data.name", "model.checkpoint",
            "speed.feature_cache"} <= set(fields)
    assert not {"p4q.export_dir", "data.data_dir", "train.log_every",
                "checkpoint.every_steps"} & set(fields)
    changed = p4q_config.get_config()
    changed.p4q.n_ctx = 8
    changed.quant.config = "w8a8"
    changed.p4q.export_dir = "/elsewhere"
    assert checkpoint_lib.differences(fields, checkpoint_lib.run_fingerprint(changed)) == [
        "p4q.n_ctx: 16 -> 8", "quant.config: 'w4a4attn8' -> 'w8a8'"]


def test_checkpoint_of_another_run_is_refused_and_left_untouched(tmp_path):
    _saved(tmp_path, {"p4q.adapter": True, "seed": 0})
    before = main_runner.tree_digest(tmp_path)
    ckpt = checkpoint_lib.Checkpointer(tmp_path, every_steps=1,
                                       fingerprint={"p4q.adapter": False, "seed": 0})
    with pytest.raises(checkpoint_lib.RunMismatchError) as e:
        ckpt.restore_latest({"w": np.zeros(3)})
    ckpt.close()
    message = str(e.value)
    assert "p4q.adapter: True -> False" in message and "seed" not in message.split("\n", 1)[1]
    assert "--config.checkpoint.restart=True" in message and "another --workdir" in message
    assert main_runner.tree_digest(tmp_path) == before


def test_checkpoint_without_fingerprint_is_not_resumed(tmp_path):
    _saved(tmp_path, None)
    ckpt = checkpoint_lib.Checkpointer(tmp_path, every_steps=1, fingerprint={"seed": 0})
    with pytest.raises(checkpoint_lib.RunMismatchError, match="no fingerprint"):
        ckpt.check_resumable()
    ckpt.close()


def test_unreadable_checkpoint_is_moved_aside_with_its_reason(tmp_path, caplog):
    fingerprint = {"seed": 0}
    _saved(tmp_path, fingerprint)
    data_files = [p for p in (tmp_path / "2").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    truncated = {}
    for path in data_files:
        os.truncate(path, path.stat().st_size // 2)
        truncated[path.relative_to(tmp_path / "2")] = path.read_bytes()
    ckpt = checkpoint_lib.Checkpointer(tmp_path, every_steps=1, fingerprint=fingerprint)
    with caplog.at_level(logging.WARNING):
        state, meta = ckpt.restore_latest({"w": np.zeros(3)})
    assert meta == {"input_position": 1, "fingerprint": fingerprint}
    np.testing.assert_array_equal(state["w"], np.ones(3))
    assert "step 2" in caplog.text and "unreadable" in caplog.text
    assert ckpt.manager.all_steps() == [1]
    ckpt.close()
    kept = tmp_path / checkpoint_lib.UNREADABLE / "2"
    assert (kept / "REASON.txt").read_text().strip()
    for relative, content in truncated.items():  # every byte still there
        assert (kept / relative).read_bytes() == content


def test_restart_moves_the_whole_previous_run_aside(tmp_path):
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "export").mkdir()
    (tmp_path / "results.json").write_text('{"mode": "p4q"}')
    (tmp_path / "events.out.tfevents.1.host").write_text("tb")
    (tmp_path / "feature_cache").mkdir()  # keyed by its own fingerprint: stays
    target = checkpoint_lib.move_run_aside(tmp_path)
    assert target.parent == tmp_path / "previous"
    assert sorted(p.name for p in target.iterdir()) == [
        "checkpoints", "events.out.tfevents.1.host", "export", "results.json"]
    assert (target / "results.json").read_text() == '{"mode": "p4q"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feature_cache", "previous"]
    assert checkpoint_lib.move_run_aside(tmp_path) is None  # nothing left to move


def test_training_refused_by_its_checkpoints_closes_the_checkpointer(tmp_path, monkeypatch):
    """An open Orbax manager at exit floods the log with its threads' tracebacks: every path
    out of `train.train`, a refusal included, closes it."""
    import jax  # pylint: disable=g-import-not-at-top
    from p4q_jax import clip, data, parallel, train  # pylint: disable=g-import-not-at-top
    from p4q_jax.p4q import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
    config = p4q_config.get_config()
    config.model.name, config.data.name = "tiny", "synthetic"
    config.speed.feature_cache = False
    config.train.num_steps, config.train.batch_size = 2, 16
    _saved(tmp_path / "checkpoints", {"seed": 0})  # another run's
    closed = []
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "close",
                        lambda self: closed.append(self.directory) or self.manager.close())
    model, params = clip.init("tiny")
    mesh = parallel.make_mesh()
    names = data.info_from_config(config.data).class_names
    text = jax.random.normal(jax.random.key(0), (len(names), model.config.embed_dim))
    teacher = teacher_lib.zeroshot(text / np.linalg.norm(text, axis=-1, keepdims=True))
    with pytest.raises(checkpoint_lib.RunMismatchError):
        train.train(config, model=model, params=parallel.place_weights(params, mesh),
                    qstate=None, teacher=teacher, class_names=names, mesh=mesh,
                    workdir=tmp_path)
    assert closed == [tmp_path / "checkpoints"]
