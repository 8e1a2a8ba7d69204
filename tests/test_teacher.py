"""The distillation teacher: rows that say how they were trained, a trained FP export as the
teacher (its logits are its own evaluation's), and the exports that cannot teach a run."""

import dataclasses
import json
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import jobs
from p4q_jax import preflight
from p4q_jax.configs import p4q as p4q_config
from p4q_jax.p4q import losses
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib
from p4q_jax.p4q import teacher as teacher_lib
from p4q_jax.p4q import classifier as classifier_lib
from p4q_jax.p4q import variants


def _config(checkpoint, variant=None, **fields):
    """The runs' config: the small p4q job's shapes of test_lean_job.py and
    test_multihost_main.py (calibration, evaluation and training batches, n_ctx), so that
    the session's compilation cache holds their shared programs once; 4 training steps,
    as nothing here depends on how far training gets."""
    config = p4q_config.get_config()
    config.model.checkpoint = str(checkpoint)
    config.data.name = "synthetic"
    config.data.synthetic_examples = 48
    config.quant.config = "w8a8"
    config.quant.calib_batches, config.quant.calib_batch_size = 1, 16
    config.eval.batch_size, config.eval.text_batch_size = 40, 64
    config.train.batch_size, config.train.num_steps, config.train.log_every = 16, 4, 2
    config.p4q.n_ctx, config.p4q.adapter_calib_batches = 4, 1
    if variant is not None:
        variants.apply(config, variant)
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    """An FP P4Q run (the teacher), then a w8a8 student distilled with KL from its export."""
    root = tmp_path_factory.mktemp("teacher")
    fp = jobs.run(_config(tiny_checkpoint, "fp_p4q"), root / "fp_p4q", mode="p4q")
    export = root / "fp_p4q" / "export"
    student = jobs.run(_config(tiny_checkpoint, loss__distillation_kind="kl",
                               loss__teacher=str(export)), root / "student", mode="p4q")
    return {"fp": fp, "student": student, "export": export, "root": root}


def test_every_trained_row_says_how_it_was_trained(runs):
    fp_zeroshot, fp_p4q = runs["fp"]["rows"]
    recipe = fp_p4q["recipe"]
    assert fp_p4q["method"] == "fp_p4q" and fp_p4q["qconfig"] is None
    assert {k: recipe[k] for k in ("prompts", "adapter", "quantized", "distillation",
                                   "distillation_weight", "temperature")} == {
        "prompts": "learned", "adapter": True, "quantized": False, "distillation": "official",
        "distillation_weight": 1.0, "temperature": None}
    teacher = recipe["teacher"]
    assert teacher["kind"] == "zeroshot" and teacher["test_top1"] == fp_zeroshot["top1"]
    assert 0 <= teacher["train_top1"] <= 100
    # The export records where the model came from and how it was trained.
    origin = classifier_lib.read_meta(runs["export"])["origin"]
    assert origin["recipe"] == recipe and origin["method"] == "fp_p4q"
    assert origin["data"]["dataset"] == "synthetic" and origin["data"]["split"] == "train"


def test_the_zero_shot_teachers_train_accuracy_from_the_cache_equals_a_pass_over_the_split(
        runs, tiny_checkpoint):
    """The train-split top-1 the job takes from the feature cache's FP features equals the
    same teacher evaluated by a pass over the training split (the eval pipeline)."""
    job = jobs._Job(_config(tiny_checkpoint, "fp_p4q"))  # pylint: disable=protected-access
    variables = job.variables()
    teacher = teacher_lib.zeroshot(job.classifier(variables))
    by_pass = jobs._teacher_train_top1(job, teacher, None)  # pylint: disable=protected-access
    from_cache = runs["fp"]["rows"][1]["recipe"]["teacher"]["train_top1"]
    assert by_pass == pytest.approx(from_cache, abs=1e-4)
    # The cache is scored in chunks: their boundaries change nothing.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(job.info.class_names), 23)
    text = np.asarray(teacher.text)
    cached = text[labels] + rng.normal(scale=0.1, size=(23, text.shape[1]))
    source = types.SimpleNamespace(cache={"teacher": cached[:, None], "label": labels})
    expected = 100 * np.mean(np.argmax(cached @ text.T, -1) == labels)
    for rows in (5, 23, 1000):
        assert jobs._teacher_train_top1(job, teacher, source, rows=rows) == pytest.approx(  # pylint: disable=protected-access
            expected)


def test_a_student_distils_from_a_trained_export_whose_accuracy_it_reports(runs):
    fp_p4q = runs["fp"]["rows"][1]
    student = runs["student"]["rows"][-1]
    teacher = student["recipe"]["teacher"]
    assert student["recipe"]["distillation"] == "kl" and student["recipe"]["temperature"] == 1
    assert (teacher["kind"], teacher["method"], teacher["path"]) == (
        "export", "fp_p4q", str(runs["export"]))
    # Its own top-1 on the test split: the FP P4Q run's, measured again through the teacher.
    assert teacher["test_top1"] == pytest.approx(fp_p4q["top1"], abs=1e-4)
    assert teacher["recipe"] == fp_p4q["recipe"]
    assert classifier_lib.read_meta(runs["root"] / "student" / "export")["origin"]["recipe"][
        "teacher"]["path"] == str(runs["export"])


def _teacher(runs, checkpoint, path=None, class_names=None):
    model, params = clip.load(checkpoint)
    job_config = _config(checkpoint)
    job = jobs._Job(job_config)  # pylint: disable=protected-access
    return model, params, teacher_lib.from_export(
        path or runs["export"], model=model, params=params,
        class_names=class_names or job.info.class_names, data_origin=job.data_origin(),
        weights=classifier_lib.weights_fingerprint(params))


def test_the_teachers_logits_are_the_exports_own_evaluation_logits(runs, tiny_checkpoint):
    """Teacher logits (its prompts through the student's FP text tower, its adapter on the FP
    image features, as the step computes them) equal what `--mode=eval` of the export
    computes from the export's own towers, within 1e-5; and the step's KL term is the KL
    to those logits."""
    model, params, teacher = _teacher(runs, tiny_checkpoint)
    size = model.config.vision.image_size
    images = jax.random.normal(jax.random.key(3), (6, size, size, 3))
    fp_features = clip.encode.apply(model, params, images, method=model.encode_image)
    scale = jnp.exp(params["logit_scale"])
    ours = losses.cosine_logits(teacher.adapt_image_features(fp_features), teacher.text, scale)

    e_model, e_params, e_qstate, trained = classifier_lib.load(runs["export"])
    assert e_qstate is None
    variables = trained.variables(e_params, None)
    theirs = losses.cosine_logits(trained.image_features(e_model, variables, images),
                                  trained.class_features(e_model, variables), scale)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)

    # The train step: KL from the teacher's frozen adapter and class features.
    prompts = prompts_lib.build(trained.class_names, n_ctx=4)
    frozen = step_lib.make_frozen(model, params, None, prompts, teacher.text,
                                  image_towers=True, teacher_adapter=teacher.adapter_state)
    context = 0.02 * jax.random.normal(jax.random.key(4), (4, model.config.text.width))
    labels = jnp.arange(6) % len(trained.class_names)
    _, terms = step_lib.loss_fn(
        {"context": context, "adapter": None}, frozen,
        {"student": fp_features, "teacher": fp_features, "label": labels}, model=model,
        prompts=prompts, adapter=None, teacher_adapter=teacher.adapter,
        weights=step_lib.LossWeights(distillation_kind="kl"))
    student = losses.cosine_logits(
        fp_features, step_lib.class_text_features(model, frozen, prompts, context), scale)
    expected = losses.kl_distillation(student, theirs)
    np.testing.assert_allclose(terms["distillation"], expected, rtol=1e-5)


def _edited_export(runs, tmp_path, edit):
    path = tmp_path / "export"
    shutil.copytree(runs["export"], path)
    meta = json.loads((path / classifier_lib.MARKER).read_text())
    edit(meta)
    (path / classifier_lib.MARKER).write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.update(class_names=m["class_names"][::-1]), "trained on other classes"),
    (lambda m: m["origin"]["model"]["config"]["text"].update(width=128),
     "another model architecture (text.width 128"),
    (lambda m: m["origin"]["data"].update(split="test"), "which is this run's test split"),
    (lambda m: m["origin"]["data"].update(num_shots=4), "trained on other data (num_shots 4"),
    (lambda m: m.update(quantized=True), "a quantized export"),
    (lambda m: m.update(origin=None), "records no base model"),
], ids=["classes", "width", "test-split", "shots", "quantized", "no-origin"])
def test_an_export_that_cannot_teach_this_run_is_refused(runs, tiny_checkpoint, tmp_path,
                                                          edit, reason):
    path = _edited_export(runs, tmp_path, edit)
    with pytest.raises(teacher_lib.TeacherError, match="loss.teacher=.*" + re.escape(reason)):
        _teacher(runs, tiny_checkpoint, path)


def test_a_teacher_of_another_checkpoint_is_refused(runs, tmp_path):
    """The same architecture with other weights (another random init) cannot teach."""
    other = tmp_path / "other"
    model, params = clip.init("tiny", seed=7)
    clip.save(other, model.config, params)
    with pytest.raises(teacher_lib.TeacherError, match="other weights of this architecture"):
        _teacher(runs, other)


def test_preflight_names_a_teacher_that_is_not_an_export(tmp_path, tiny_checkpoint):
    config = _config(tiny_checkpoint, loss__teacher=str(tmp_path))
    with pytest.raises(preflight.ConfigError, match="loss.teacher=.*not a P4Q export"):
        preflight.check(config, tmp_path / "run", mode="p4q")
    config = _config(tiny_checkpoint, "kl_trained_teacher")
    with pytest.raises(preflight.ConfigError, match="loss.teacher=None: expected 'zeroshot'"):
        preflight.check(config, tmp_path / "run", mode="p4q")


def test_an_exports_prompts_and_adapter_refuse_another_clip(runs):
    """Applied to a CLIP of another architecture, an export's context and adapter raise
    instead of returning features (the export records the architecture it trained on)."""
    model, params, _, trained = classifier_lib.load(runs["export"])
    assert trained.model_config is not None
    variables = trained.variables(params, None)
    assert trained.class_features(model, variables).shape[0] == len(trained.class_names)
    other, other_params = clip.init("tiny-rn")
    images = jnp.zeros((2, other.config.vision.image_size, other.config.vision.image_size, 3))
    with pytest.raises(ValueError, match="trained on another CLIP .*vision"):
        trained.class_features(other, trained.variables(other_params, None))
    with pytest.raises(ValueError, match="trained on another CLIP"):
        trained.image_features(other, trained.variables(other_params, None), images)
    # Without a record (an older export), a context of another width is still refused.
    unrecorded = dataclasses.replace(trained, model_config=None,
                                     context=jnp.zeros((4, model.config.text.width * 2)))
    with pytest.raises(ValueError, match="the learned context has width"):
        unrecorded.class_features(model, variables)
