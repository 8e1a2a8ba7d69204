"""P4Q training: the feature cache, checkpoints, and main.py's p4q / eval jobs end to end (in
this process). A `main.py` run killed with SIGKILL and resumed: test_multihost_main.py."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from p4q_jax import checkpoint as checkpoint_lib
from p4q_jax import clip
from p4q_jax import parallel
from p4q_jax import quant
from p4q_jax.configs import p4q as p4q_config
from p4q_jax.p4q import features
from p4q_jax.p4q import classifier as classifier_lib

import main_runner


@pytest.fixture(scope="module")
def tiny():
    model, params = clip.init("tiny", seed=4)
    images = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    qstate = quant.calibrate(model, params, quant.QConfig.parse("w4a4attn8"), images=[images],
                             texts=["a photo of a cat.", "a photo of a dog."])
    return model, params, qstate, images


def test_cache_holds_both_views_of_student_and_teacher(tiny):
    model, params, qstate, images = tiny
    mesh = parallel.make_mesh()
    labels = np.arange(16, dtype=np.int32) % 3
    mask = np.arange(16) < 13  # the padded tail of an eval-style batch
    index = np.where(mask, np.arange(16), -1)
    batches = [{"image": images[:8], "label": labels[:8], "mask": mask[:8], "index": index[:8]},
               {"image": images[8:], "label": labels[8:], "mask": mask[8:], "index": index[8:]}]
    cache = features.build_cache(model, params, qstate, batches, mesh=mesh)
    assert cache["index"].tolist() == list(range(13))
    assert cache["student"].shape == (13, 2, 64) and cache["label"].tolist() == labels[:13].tolist()
    flipped = images[:13, :, ::-1]  # horizontal flip of NHWC images, independently of the code
    for view, x in ((0, images[:13]), (1, flipped)):
        np.testing.assert_allclose(cache["student"][:, view],
                                   clip.encode_image(model, params, x, qstate=qstate),
                                   atol=2e-5)
        np.testing.assert_allclose(cache["teacher"][:, view], clip.encode_image(model, params, x),
                                   atol=2e-5)
    assert np.abs(cache["student"] - cache["teacher"]).max() > 1e-3  # the student is quantized


def test_cached_input_is_a_function_of_seed_and_step():
    n = 24
    cache = {"student": np.arange(n * 2 * 3, dtype=np.float32).reshape(n, 2, 3),
             "teacher": -np.arange(n * 2 * 3, dtype=np.float32).reshape(n, 2, 3),
             "label": np.arange(n, dtype=np.int32)}
    source = features.CachedInput(cache, global_batch=8, num_examples=n, seed=3)
    assert source.steps_per_epoch == 3
    for epoch in range(2):  # every example once per epoch
        seen = np.concatenate([source.batch(epoch * 3 + i)["label"] for i in range(3)])
        assert sorted(seen.tolist()) == list(range(n))
    later = source.batch(7)
    again = features.CachedInput(cache, global_batch=8, num_examples=n, seed=3).batch(7)
    for name in features.FIELDS:
        np.testing.assert_array_equal(later[name], again[name])
    views = np.concatenate([source.batch(s)["student"][:, 0] % 6 >= 3 for s in range(6)])
    assert 0.2 < views.mean() < 0.8  # both views are drawn
    np.testing.assert_array_equal(later["teacher"], -later["student"])  # rows stay paired
    with pytest.raises(ValueError, match="train.batch_size=32"):
        features.CachedInput(cache, global_batch=32, num_examples=n, seed=3)


def test_cache_of_random_crop_views(tiny):
    """speed.feature_cache_views: one pass of the training split per random crop, each view
    the encoding of that pass's images; the input then draws among all of them."""
    from p4q_jax import data  # pylint: disable=g-import-not-at-top
    from p4q_jax.configs import base as base_config  # pylint: disable=g-import-not-at-top
    model, params, qstate, _ = tiny
    mesh = parallel.make_mesh()
    cfg = base_config.get_config().data
    cfg.update(dict(name="synthetic", shot_seed=0, flip=True, augment="coop",
                    shuffle_buffer=64, synthetic_classes=3, synthetic_examples=12))

    def images(view):
        ds = data.create_dataset(cfg, split="train", batch_size=8, image_size=32, train=False,
                                 seed=5, augment_view=view)
        return [b for b in data.as_numpy_batches(ds)]

    passes = [images(v) for v in range(3)]
    caches = [features.build_cache(model, params, qstate, p, mesh=mesh, flip=False)
              for p in passes]
    cache = features.stack_views(caches)
    assert cache["student"].shape == (12, 3, 64)
    for view, batches in enumerate(passes):
        pixels = np.concatenate([b["image"][b["mask"]] for b in batches])
        np.testing.assert_allclose(cache["teacher"][:, view], clip.encode_image(model, params,
                                                                                 pixels),
                                   atol=2e-5)
    np.testing.assert_array_equal(images(1)[0]["image"], passes[1][0]["image"])  # seeded
    assert np.abs(passes[0][0]["image"] - passes[1][0]["image"]).max() > 0.1  # other crops
    source = features.CachedInput(cache, global_batch=8, num_examples=12, seed=1)
    drawn = {tuple(np.round(row, 5)) for s in range(12)
             for row in source.batch(s)["teacher"][:, :2]}
    rows_per_view = {tuple(np.round(row, 5)) for v in range(3) for row in cache["teacher"][:, v, :2]}
    assert drawn <= rows_per_view and len(drawn) > 12  # more than one view per image drawn


def test_cache_on_disk_round_trips_and_checks_its_key(tmp_path):
    cache = {"student": np.ones((5, 2, 4), np.float32), "teacher": np.zeros((5, 2, 4), np.float32),
             "label": np.arange(5, dtype=np.int32), "index": np.arange(5, dtype=np.int64)}
    key = features.cache_key(model="tiny", acts={"a": np.ones(3)})
    assert key != features.cache_key(model="tiny", acts={"a": np.full(3, 2.0)})
    features.save_cache(tmp_path, cache, key)
    loaded = features.load_cache(tmp_path, key)
    for name in features.PART_FIELDS:
        np.testing.assert_array_equal(loaded[name], cache[name])
    assert features.load_cache(tmp_path, "another") is None
    assert features.load_cache(tmp_path / "missing", key) is None


@pytest.mark.parametrize("feature_cache, augment, views, expected", [
    (True, "flip", 0, True), (True, "coop", 0, False), (True, "coop", 2, True),
    (False, "flip", 0, False), (False, "coop", 2, False)])
def test_which_runs_use_the_cache(feature_cache, augment, views, expected):
    config = p4q_config.get_config()
    config.speed.feature_cache, config.data.augment = feature_cache, augment
    config.speed.feature_cache_views = views
    assert features.uses_cache(config) is expected


def test_a_runs_cache_key_is_the_one_earlier_versions_wrote(monkeypatch):
    """The key a run looks its cache up by (model, data, views, quantization), pinned to the
    value the code before `features.cached_input` computed, so existing caches are reused."""
    keys = []

    def load_cache(directory, key):
        keys.append((str(directory), key))
        raise StopIteration  # the key is all this test needs

    monkeypatch.setattr(features, "load_cache", load_cache)
    model, _ = clip.init("tiny", seed=0)
    config = p4q_config.get_config()
    config.data.name = "synthetic"
    for shots in (0, 4):
        config.data.num_shots = shots
        with pytest.raises(StopIteration):
            features.cached_input(config, model=model, params=None, qstate=None, mesh=None,
                                  workdir="/run")
    assert keys[0] == ("/run/feature_cache", "ea4b8066f449f4c6")
    assert keys[1][1] != keys[0][1]


_P4Q_FLAGS = ["--config=configs/p4q.py", "--config.data.name=cifar10",
              "--config.quant.calib_batches=2", "--config.quant.calib_batch_size=16",
              "--config.eval.batch_size=24", "--config.eval.text_batch_size=64",
              "--config.train.batch_size=16", "--config.p4q.n_ctx=4",
              "--config.p4q.adapter_calib_batches=2"]


# Checkpoints every 5 steps: 4 of them, of which the last 3 are kept.
_STEPS = 20


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_checkpoint):
    """(flags, workdir) of one uninterrupted p4q job of main.py on mock CIFAR-10 (in this
    process), given relative paths as in the README (Orbax itself takes only absolute ones)."""
    flags = [*_P4Q_FLAGS, f"--config.model.checkpoint={main_runner.relative(tiny_checkpoint)}",
             f"--config.train.num_steps={_STEPS}", "--config.train.log_every=5",
             "--config.checkpoint.every_steps=5"]
    workdir = tmp_path_factory.mktemp("straight")
    leftover = workdir / ".export.tmp-killed"  # what an export killed mid-write leaves
    (leftover / "trained").mkdir(parents=True)
    main_runner.run_job([*flags, f"--workdir={main_runner.relative(workdir)}",
                         f"--config.p4q.export_dir={main_runner.relative(workdir)}/export"])
    assert not leftover.exists()
    return flags, workdir


def test_p4q_then_eval_through_main(straight_run):
    _, workdir = straight_run
    results = json.loads((workdir / "results.json").read_text())
    fp, ptq, p4q = results["rows"]
    assert (fp["method"], ptq["method"], p4q["method"]) == ("fp_zeroshot", "ptq", "p4q")
    assert ptq["qconfig"] == p4q["qconfig"] == "w4a4attn8"
    assert set(ptq["diagnostics"]["cosine_to_fp"]) == {"image", "text"}  # the PTQ report
    assert {s["bits"] for s in ptq["diagnostics"]["worst_sites"]} <= {4, 8}
    assert fp["count"] == ptq["count"] == p4q["count"] == 50
    assert [h["step"] for h in results["history"]] == list(range(5, _STEPS + 1, 5))
    assert {"cross_entropy", "distillation", "lr_context", "lr_adapter"} <= set(
        results["history"][0])
    assert (workdir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tags = {value.tag for path in workdir.glob("events.out.tfevents.*")
            for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
            for value in tf.compat.v1.Event.FromString(record).summary.value}
    assert {"cross_entropy", "lr_context", "eval/ptq_top1", "eval/p4q_top5"} <= tags
    # The last 3 checkpoints are kept.
    assert main_runner.complete_checkpoint_steps(workdir / "checkpoints") == [10, 15, 20]
    # The export names the run that wrote it (a run replaces only its own export).
    assert classifier_lib.writer(workdir / "export")["workdir"] == str(workdir)

    # Evaluating the export (WORKDIR/export by default) keeps the training's results.json.
    training_results = (workdir / "results.json").read_bytes()
    main_runner.run_job(["--config=configs/p4q.py", "--mode=eval", "--config.data.name=cifar10",
                         "--config.eval.batch_size=24",
                         f"--workdir={main_runner.relative(workdir)}"])
    (row,) = json.loads((workdir / "eval_results.json").read_text())["rows"]
    assert row["top1"] == p4q["top1"] and row["top5"] == p4q["top5"]
    assert (workdir / "results.json").read_bytes() == training_results


def test_rerun_with_another_config_is_refused_and_loses_nothing(straight_run):
    flags, workdir = straight_run
    before = main_runner.tree_digest(workdir)
    # main.py exits with status 1 and this message (test_outputs.py runs one such refusal).
    with pytest.raises(checkpoint_lib.RunMismatchError) as refused:
        main_runner.run_job([*flags, "--config.p4q.adapter=False", "--config.p4q.n_ctx=8",
                             "--config.quant.config=w8a8", f"--workdir={workdir}"])
    for line in ("p4q.adapter: True -> False", "p4q.n_ctx: 4 -> 8",
                 "quant.config: 'w4a4attn8' -> 'w8a8'", "--config.checkpoint.restart=True"):
        assert line in str(refused.value)
    assert main_runner.tree_digest(workdir) == before


def test_restart_moves_the_old_run_aside_and_trains_afresh(tmp_path, straight_run):
    flags, straight = straight_run
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    old_results = (workdir / "results.json").read_bytes()
    main_runner.run_job([*flags, "--config.p4q.n_ctx=8", "--config.train.num_steps=5",
                         "--config.checkpoint.restart=True", f"--workdir={workdir}"])
    (previous,) = (workdir / "previous").iterdir()
    assert (previous / "results.json").read_bytes() == old_results
    assert main_runner.complete_checkpoint_steps(previous / "checkpoints") == [10, 15, 20]
    assert (previous / "export" / "p4q.json").exists()
    results = json.loads((workdir / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [5]
    _, _, _, trained = classifier_lib.load(workdir / "export")
    assert trained.context.shape[0] == 8
