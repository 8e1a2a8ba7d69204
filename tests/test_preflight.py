"""Everything the config alone decides is refused before any work, naming the field."""

import dataclasses
import logging
import os
import subprocess
import sys

from absl import flags
import ml_collections
import PIL.Image
import pytest

from p4q_jax import clip
from p4q_jax import preflight
from p4q_jax import results
from p4q_jax import schema
from p4q_jax.clip import architectures
from p4q_jax.configs import base as base_config
from p4q_jax.configs import default as default_config
from p4q_jax.configs import p4q as p4q_config

import main_runner


def _p4q(**fields):
    config = p4q_config.get_config()
    config.data.name = "synthetic"
    config.train.batch_size = 64  # the synthetic training set's size
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        config[section][name] = value
    return config


def _problems(config, workdir, mode="p4q"):
    with pytest.raises(preflight.ConfigError) as e:
        preflight.check(config, workdir, mode=mode)
    return str(e.value)


def test_a_good_config_passes_and_paths_become_absolute(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tiny_checkpoint.parent)
    config = _p4q(model__checkpoint=tiny_checkpoint.name, p4q__export_dir="runs/x/export",
                  speed__cache_dir="~/cache")
    checked, workdir = preflight.check(config, "runs/x", mode="p4q")
    assert workdir == tiny_checkpoint.parent / "runs" / "x"
    assert checked.model.checkpoint == str(tiny_checkpoint)
    assert checked.p4q.export_dir == str(tiny_checkpoint.parent / "runs/x/export")
    assert checked.speed.cache_dir == os.path.expanduser("~/cache")
    assert config.model.checkpoint == tiny_checkpoint.name  # the caller's config is not changed
    assert not (tiny_checkpoint.parent / "runs").exists()  # nothing created


def test_urls_are_kept_as_they_are():
    assert preflight.absolute("gs://bucket/run") == "gs://bucket/run"


@pytest.mark.parametrize("fields, expected", [
    ({"p4q__position": "middel"}, "p4q.position='middel': expected one of ['end', 'middle', "
                                  "'front']"),
    ({"loss__distillation_kind": "kld"}, "loss.distillation_kind='kld': expected one of ['kl', "
                                         "'official', 'none']"),
    ({"model__dtype": "float99"}, "model.dtype='float99': expected one of"),
    ({"train__batch_size": 102}, "train.batch_size=102: expected a multiple of the 4 "
                                 "data-parallel devices"),
    ({"quant__calib_batch_size": 30}, "quant.calib_batch_size=30: expected a multiple of the 4"),
    ({"eval__batch_size": 14}, "eval.batch_size=14: expected a multiple of the 4"),
    ({"quant__config": "w9a3"}, "quant.config='w9a3': "),
    ({"quant__compensation": "gptq"}, "quant.compensation='gptq': expected one of ['none', "
                                      "'qwt']"),
    ({"train__num_steps": -1}, "train.num_steps=-1: expected an integer >= 0"),
    ({"train__num_steps": 0, "train__epochs": 0}, "train.epochs=0: expected an integer >= 1"),
    ({"train__num_steps": 10, "train__warmup_steps": 10}, "train.warmup_steps=10: expected "
                                                          "fewer than train.num_steps=10"),
    ({"loss__temperature": 0.0}, "loss.temperature=0.0: expected a finite number > 0"),
    ({"p4q__adapter_ratio": 1.5}, "p4q.adapter_ratio=1.5: expected a finite number in [0, 1]"),
    ({"checkpoint__every_steps": 0}, "checkpoint.every_steps=0: expected an integer >= 1"),
    ({"mesh__model": 3}, "mesh.model=3: expected an integer >= 1 dividing the 4 devices"),
    ({"model__checkpoint": "/no/such/ViT-B-32.pt"}, "model.checkpoint='/no/such/ViT-B-32.pt': "
                                                    "no such file or directory"),
    ({"data__name": "cifar1000"}, "data.name='cifar1000': expected one of"),
    ({"data__augment": "crop"}, "data.augment='crop': expected one of ['flip', 'coop']"),
    ({"data__templates": "all"}, "data.templates='all': expected one of ['coop', 'clip']"),
    ({"train__schedule": "linear"}, "train.schedule='linear': expected one of ['cosine', "
                                     "'coop', 'official_stages']"),
    ({"train__epochs_from_shots": True, "data__num_shots": 3},
     "train.epochs_from_shots=True: CoOp's epochs are defined for data.num_shots in "
     "[1, 2, 4, 8, 16], not 3"),
    ({"speed__feature_cache_views": 4}, "speed.feature_cache_views=4: applies to random crops "
                                        "(data.augment='coop')"),
    ({"train__prompt_momentum": 1.0}, "train.prompt_momentum=1.0: expected a finite number in "
                                      "[0, 1)"),
    ({"speed__xla_schedule": "fast"}, "speed.xla_schedule='fast': expected one of ['auto', "
                                      "'memory', 'concurrency']"),
    ({"train__prompt_weight_decay": -1e-4}, "train.prompt_weight_decay=-0.0001: expected a "
                                            "finite number >= 0"),
])
def test_each_bad_field_is_named_with_what_is_allowed(tmp_path, fields, expected):
    assert expected in _problems(_p4q(**fields), tmp_path)


def test_an_unknown_field_is_refused_naming_it_and_the_fields_nearby(tmp_path):
    config = _p4q()
    config.train.prompt_lrr = 1e-3  # a typo of train.prompt_lr: nothing would read it
    message = _problems(config, tmp_path)
    assert "train.prompt_lrr: not a field of section 'train'" in message
    assert "did you mean train.prompt_lr or train.warmup_lr?" in message
    assert "its fields: adapter_eps, adapter_lr," in message
    config = _p4q()
    config.seeed = 1  # at the top level
    assert "seeed: neither a field nor a section" in _problems(config, tmp_path, mode="zeroshot")


def test_a_misspelled_section_is_refused_once_naming_the_sections(tmp_path):
    config = _p4q()
    config.trian = ml_collections.ConfigDict({"batch_size": 64, "epochs": 2})
    message = _problems(config, tmp_path)
    assert "this config has 1 unknown or missing field(s)" in message
    assert "trian: not a section of the config schema (p4q_jax/schema.py); did you mean " \
        "train?" in message


def test_a_config_without_a_field_of_the_schema_is_refused(tmp_path):
    config = _p4q()
    del config.speed["length_buckets"]
    assert "speed.length_buckets: missing" in _problems(config, tmp_path)


def test_the_schema_names_a_command_line_override_it_does_not_hold():
    """What main.py prints for `--config.FIELD=VALUE` of an unknown field (ml_collections
    refuses it while parsing the flags, before preflight)."""
    assert schema.describe_unknown("train.prompt_lr") is None
    assert schema.describe_unknown("seed") is None
    assert "did you mean train.epochs?" in schema.describe_unknown("train.epoch")
    assert "did you mean speed?" in schema.describe_unknown("sped.remat")


def test_qwt_compensation_is_refused_outside_single_process_quantized_jobs(tmp_path,
                                                                          monkeypatch):
    preflight.check(_p4q(quant__compensation="qwt"), tmp_path / "p4q", mode="p4q")
    demo = default_config.get_config()
    demo.quant.compensation = "qwt"
    assert ("quant.compensation='qwt': applies to --mode=ptq and --mode=p4q only (in the demo: "
            "the qwt_p4q variant in demo.ablations)" in _problems(demo, tmp_path, mode="demo"))
    assert ("quant.compensation='qwt': compensates a quantized model; p4q.quantize is False"
            in _problems(_p4q(quant__compensation="qwt", p4q__quantize=False), tmp_path))
    monkeypatch.setattr(preflight.jax, "process_count", lambda: 2)
    assert ("quant.compensation='qwt': QwT's solve reads the calibration activations on one "
            "host" in _problems(_p4q(quant__compensation="qwt"), tmp_path, mode="ptq"))


def test_every_problem_is_listed_at_once(tmp_path):
    message = _problems(_p4q(p4q__position="x", loss__distillation_kind="y",
                             train__batch_size=7), tmp_path)
    assert "(3 problem(s))" in message
    assert all(f in message for f in ("p4q.position", "loss.distillation_kind",
                                      "train.batch_size"))


def test_workdir_that_is_a_file_or_unwritable(tmp_path):
    file = tmp_path / "file"
    file.write_text("not a directory")
    assert f"workdir='{file}': {file} is a file" in _problems(_p4q(), file)
    assert f"{file} is a file" in _problems(_p4q(), file / "sub" / "dir")
    # /sys refuses new files even to root (CI runs as root).
    assert "workdir='/sys/p4q_run': cannot write in /sys" in _problems(_p4q(), "/sys/p4q_run")
    assert "p4q.export_dir='/sys/export': cannot write" in _problems(
        _p4q(p4q__export_dir="/sys/export"), tmp_path)


def test_a_mode_never_overwrites_another_modes_results(tmp_path):
    results.write_json(results.file_for(tmp_path, "p4q"), {"mode": "p4q", "rows": []})
    config = base_config.get_config()
    message = _problems(config, tmp_path, mode="zeroshot")
    assert f"{tmp_path}/results.json holds the results of mode 'p4q'" in message
    preflight.check(_p4q(), tmp_path, mode="p4q")  # its own results: a rerun may rewrite them
    assert results.file_for(tmp_path, "eval") != results.file_for(tmp_path, "p4q")


def test_eval_needs_an_export(tmp_path):
    assert f"p4q.export_dir='{tmp_path}/export': not a P4Q export" in _problems(
        _p4q(), tmp_path, mode="eval")


def test_demo_needs_bit_settings_and_quantization(tmp_path):
    config = default_config.get_config()
    config.demo.qconfigs = ()
    config.p4q.quantize = False
    message = _problems(config, tmp_path, mode="demo")
    assert "demo.qconfigs=[]: name at least one bit setting" in message
    assert "p4q.quantize=False" in message


def test_folder_dataset_root_must_exist(tmp_path):
    config = _p4q(data__name="folder", data__folder=str(tmp_path / "missing"))
    assert f"data.folder='{tmp_path}/missing': no such directory" in _problems(config, tmp_path)


def test_main_refuses_a_bad_config_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    python, *argv = main_runner.command(
        ["--config=configs/p4q.py", "--config.p4q.position=middel",
         "--config.train.batch_size=102", f"--workdir={workdir}"], mock_examples=None)
    done = subprocess.run([python, "-X", "importtime", *argv], cwd=main_runner.REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "error: the p4q job cannot run with this config (2 problem(s))" in done.stderr
    assert "Traceback" not in done.stderr
    assert not workdir.exists()
    # Refused before TensorFlow is imported (about 5 s on 2 cores; refusal takes ~3.5 s).
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "jax" in imported
    assert not {"tensorflow", "clu.metric_writers"} & imported


def test_main_names_an_unknown_override_without_a_traceback(tmp_path, monkeypatch):
    """ml_collections refuses `--config.FIELD` of an unknown field while main.py parses its
    flags (a bare KeyError); main.py's flag parser exits with the schema's message instead
    (a SystemExit whose code is the message: exit status 1 and the message on stderr, as
    `test_main_refuses_a_bad_config_before_any_work` sees for a child process). Parsed here
    into absl's global flags, which are unparsed afterwards for the other tests."""
    import main  # pylint: disable=g-import-not-at-top  (the repository root's main.py)
    monkeypatch.chdir(main_runner.REPO)  # main.py's config paths are relative to it
    workdir = tmp_path / "run"
    argv = ["main.py", "--config=configs/p4q.py", "--config.train.prompt_lrr=1e-3",
            "--config.trian.epochs=2", f"--workdir={workdir}"]
    monkeypatch.setattr(sys, "argv", argv)  # where ml_collections looks for the overrides
    level = logging.getLogger("absl").level  # parsing absl's flags sets it (--verbosity)
    try:
        with pytest.raises(SystemExit) as done:
            main._parse_flags(argv)  # pylint: disable=protected-access
    finally:
        flags.FLAGS.unparse_flags()
        logging.getLogger("absl").setLevel(level)
    message = done.value.code
    assert isinstance(message, str) and message.startswith("error: unknown config field(s):")
    assert "train.prompt_lrr: not a field of section 'train'" in message
    assert "did you mean train.prompt_lr or train.warmup_lr?" in message
    assert "trian: not a section of the config schema (p4q_jax/schema.py); did you mean " \
        "train?" in message
    assert not workdir.exists()


def test_folder_dataset_with_a_broken_image_is_refused_naming_it(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            PIL.Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / name / "a.png")
    broken = tmp_path / "data" / "train" / "dog" / "b.jpg"
    broken.write_text("<html>not an image</html>")
    config = _p4q(data__name="folder", data__folder=str(tmp_path / "data"))
    assert f"{broken}: not a JPEG" in _problems(config, tmp_path / "run")


def test_coop_dataset_without_root_or_split_file(tmp_path):
    assert "needs CoOp's data folder (config.data.root)" in _problems(
        _p4q(data__name="coop/dtd"), tmp_path)
    (tmp_path / "data/dtd/images").mkdir(parents=True)
    message = _problems(_p4q(data__name="coop/dtd", data__root=str(tmp_path / "data")), tmp_path)
    assert f"{tmp_path}/data/dtd/split_zhou_DescribableTextures.json does not exist" in message
    assert "coop/dtd" in _problems(_p4q(data__name="coop/dtdd"), tmp_path)  # listed as known


@pytest.mark.parametrize("fields, expected", [
    ({"p4q__adapter": False, "loss__distillation": float("nan")},
     "loss.distillation=nan: expected a finite number >= 0"),
    ({"train__prompt_lr": float("inf")}, "train.prompt_lr=inf: expected a finite number > 0"),
    ({"train__adapter_lr": float("inf")}, "train.adapter_lr=inf: expected a finite number > 0"),
    ({"loss__cross_entropy": float("inf")},
     "loss.cross_entropy=inf: expected a finite number >= 0"),
    ({"train__prompt_final_fraction": float("nan")},
     "train.prompt_final_fraction=nan: expected a finite number in [0, 1]"),
    ({"train__adapter_weight_decay": -0.5},
     "train.adapter_weight_decay=-0.5: expected a finite number >= 0"),
    ({"seed": -1}, "seed=-1: expected an integer in [0, 2**31)"),
    ({"seed": 2**31}, "seed=2147483648: expected an integer in [0, 2**31)"),
    ({"data__shot_seed": -2}, "data.shot_seed=-2: expected an integer >= 0"),
    ({"data__shuffle_buffer": 0}, "data.shuffle_buffer=0: expected an integer >= 1"),
    ({"data__synthetic_examples": 0}, "data.synthetic_examples=0: expected an integer >= 1"),
    ({"p4q__n_ctx": 100}, "p4q.n_ctx=100: class name 'airplane': its prompt has 104 tokens, "
                          "more than the context length 77"),
    ({"p4q__ctx_init": " "}, "p4q.ctx_init=' ': has no tokens"),
    ({"train__batch_size": 128, "data__synthetic_examples": 64},
     "train.batch_size=128: expected at most the 64 training examples"),
])
def test_non_finite_out_of_range_and_oversized_fields_are_named(tmp_path, fields, expected):
    fields = dict(fields)
    config = _p4q(**{k: v for k, v in fields.items() if "__" in k})
    if "seed" in fields:
        config.seed = fields["seed"]
    assert expected in _problems(config, tmp_path)


def test_every_float_field_must_be_finite_at_any_depth(tmp_path):
    config = _p4q()
    config.train.adapter_lr = float("-inf")  # no check of the ptq job reads it by name
    config.train.stage_epochs = (1.0, float("nan"))
    message = _problems(config, tmp_path, mode="ptq")
    assert "train.adapter_lr=-inf: expected a finite number" in message
    assert "train.stage_epochs=(1.0, nan): expected finite numbers" in message


def test_the_prompt_length_uses_the_checkpoints_context_length(tmp_path):
    """A checkpoint whose text tower reads 40 positions: 37 context tokens leave no room for
    a class name there (SOT + 37 + name + "." + EOT = 41), whereas a named 77-position model
    takes them."""
    config = architectures.get_config("tiny")
    short = dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=40))
    clip.save(tmp_path / "short", short, clip.init(short, seed=0)[1])
    assert "p4q.n_ctx=37: class name 'airplane': its prompt has 41 tokens, more than the " \
           "context length 40" in _problems(
               _p4q(model__checkpoint=str(tmp_path / "short"), p4q__n_ctx=37), tmp_path)
    preflight.check(_p4q(p4q__n_ctx=37), tmp_path, mode="p4q")
    phrase = "a photo of a " * 18
    assert f"p4q.ctx_init={phrase!r}: class name 'airplane': its prompt has 76 tokens" in _problems(
        _p4q(p4q__ctx_init=phrase, model__checkpoint=str(tmp_path / "short")), tmp_path)


def test_a_batch_that_fits_the_few_shot_set_passes(tmp_path):
    """8 shots x 10 classes = 80 examples: 80 passes with the feature cache; 88 does not;
    without the cache a smaller set is trained in full batches (no refusal)."""
    config = _p4q(data__num_shots=8, data__synthetic_examples=200, train__batch_size=80)
    preflight.check(config, tmp_path, mode="p4q")
    config.train.batch_size = 88
    assert "train.batch_size=88: expected at most the 80 training examples" in _problems(
        config, tmp_path)
    config.speed.feature_cache = False
    preflight.check(config, tmp_path, mode="p4q")
