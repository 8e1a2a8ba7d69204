"""Every experiment config loads, and its values are ones the code accepts."""

import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

from p4q_jax import configs
from p4q_jax import data
from p4q_jax import preflight
from p4q_jax import quant
from p4q_jax import schema
from p4q_jax.p4q import losses
from p4q_jax.p4q import prompts
from p4q_jax.p4q import step

CONFIGS = sorted(p.stem for p in pathlib.Path(configs.__file__).parent.glob("*.py")
                 if p.stem != "__init__")


def _variants(name):
    module = importlib.import_module(f"p4q_jax.configs.{name}")
    return [module.get_config(v) for v in module.VARIANTS] if hasattr(module, "VARIANTS") \
        else [module.get_config()]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_values_are_accepted(name):
    for config in _variants(name):
        assert config.mode in ("zeroshot", "ptq", "p4q", "demo", "qat")
        if config.data.name.startswith(data.coop.PREFIX):  # the data folder is the user's
            assert config.data.name in data.NAMES
            assert config.data.templates in data.coop.TEMPLATE_CHOICES
        else:
            data.info_from_config(config.data)
        assert config.data.augment in data.AUGMENTATIONS
        quant.QConfig.parse(config.quant.config)
        if config.mode == "demo":
            assert config.demo.qconfigs
            for name in config.demo.qconfigs:
                quant.QConfig.parse(name)
            assert pathlib.Path(config.model.checkpoint).is_dir()
        if config.mode in ("p4q", "demo", "qat"):
            step.loss_weights(config.loss)
            assert config.loss.distillation_kind in losses.DISTILLATIONS
            assert config.p4q.position in prompts.POSITIONS


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_sets_only_fields_of_the_schema_and_all_of_them(name):
    for config in _variants(name):
        assert schema.unknown(config) == [] and schema.missing(config) == []
        preflight.check_schema(config)


def test_the_library_reads_config_fields_directly():
    """No `config.X.get("field", default)` fallback: the schema's default is the one."""
    pattern = re.compile(r"\b(config|cfg)(\.[a-z_]+)*\.get\(")
    package = pathlib.Path(schema.__file__).parent
    found = [f"{path.relative_to(package)}:{i}: {line.strip()}"
             for path in sorted(package.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_no_library_module_imports_the_experiment_configs():
    package = pathlib.Path(schema.__file__).parent
    importers = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
                 if "configs" not in path.relative_to(package).parts
                 and re.search(r"^\s*from p4q_jax\.configs import|^\s*import p4q_jax\.configs",
                               path.read_text(), re.M)]
    assert importers == []


def test_variants_differ_where_they_say():
    from p4q_jax.configs import ablations, baselines  # pylint: disable=g-import-not-at-top
    assert not baselines.get_config("coop_fp").p4q.quantize
    assert baselines.get_config("coop_ptq").p4q.quantize
    assert not ablations.get_config("prompts_only").p4q.adapter
    assert not ablations.get_config("adapter_only").p4q.train_prompts
    assert ablations.get_config("no_distillation").loss.distillation_kind == "none"
    assert ablations.get_config("no_distillation").loss.distillation == 0
    assert ablations.get_config("kl_distillation").loss.distillation_kind == "kl"
    assert ablations.get_config("kl_trained_teacher").loss.teacher is None  # to be given
    assert ablations.get_config("prompts_only_no_distillation").loss.distillation == 0
    assert not ablations.get_config("adapter_only_no_distillation").p4q.train_prompts
    fp_p4q = baselines.get_config("fp_p4q")
    assert not fp_p4q.p4q.quantize and fp_p4q.p4q.adapter and fp_p4q.p4q.method == "fp_p4q"
    from p4q_jax.configs import default  # pylint: disable=g-import-not-at-top
    demo, ablated = default.get_config(), default.get_config("adapter_only")
    assert (demo.mode, demo.data.name, demo.demo.coop_fp) == ("demo", "shapes_warm", True)
    assert not demo.demo.fp_p4q and not demo.demo.ablations  # `python main.py` stays short
    grid = default.get_config("grid")
    assert grid.demo.fp_p4q and set(grid.demo.ablations) == set(ablations.VARIANTS)
    control = default.get_config("shapes_control")
    assert control.data.name == "shapes" and control.demo.ablations == (
        "no_distillation", "kl_distillation")
    assert (ablated.mode, ablated.quant.config, ablated.p4q.method) == (
        "p4q", "w4a4attn8", "p4q_adapter_only")
    assert not ablated.p4q.train_prompts
    assert ablated.train.to_dict() == demo.train.to_dict()  # the demo's recipe
    from p4q_jax.configs import coop_fewshot  # pylint: disable=g-import-not-at-top
    coop = coop_fewshot.get_config("coop_fp")
    assert not coop.p4q.quantize and not coop.p4q.adapter and coop.loss.distillation == 0
    p4q_4bit = coop_fewshot.get_config("p4q_w4a4attn8")
    assert p4q_4bit.p4q.quantize and p4q_4bit.p4q.adapter
    assert p4q_4bit.quant.config == "w4a4attn8" and p4q_4bit.loss.distillation > 0
    for config in (coop, p4q_4bit):  # CoOp's recipe in both
        assert (config.train.batch_size, config.train.prompt_lr, config.train.schedule,
                config.data.augment, config.p4q.n_ctx) == (32, 0.002, "coop", "coop", 16)
    with pytest.raises(ValueError, match="ablation 'nope' unknown"):
        ablations.get_config("nope")


def test_configs_import_from_the_installed_package_outside_the_repository(tmp_path):
    """A Colab user has the package, not the repository: no `configs/` beside them."""
    code = ("import pathlib, p4q_jax.configs as c, importlib; "
            "names = [p.stem for p in pathlib.Path(c.__file__).parent.glob('*.py')]; "
            "[importlib.import_module('p4q_jax.configs.' + n) for n in names]; "
            "from p4q_jax.configs import default; print(default.get_config().mode)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "demo"


def test_repository_configs_link_is_the_package():
    """`--config=configs/NAME.py` (README) and the package are one set of files."""
    link = pathlib.Path(__file__).parents[1] / "configs"
    assert link.resolve() == pathlib.Path(configs.__file__).parent.resolve()


def test_the_method_defaults_to_the_public_codes_distillation_from_the_zero_shot_teacher():
    """The public code's loss (`cross_entropy(teacher_probs, student_probs)`) is the default
    of the base P4Q config and of every config meant as the paper's recipe."""
    from p4q_jax.configs import (cifar100_vitb32_official448, cifar100_vitb32_w4a4attn8,  # pylint: disable=g-import-not-at-top
                                 coop_fewshot, default, imagenet_vitb32_w8a8, p4q)
    configs = [p4q.get_config(), default.get_config(), cifar100_vitb32_w4a4attn8.get_config(),
               cifar100_vitb32_official448.get_config(), imagenet_vitb32_w8a8.get_config(),
               coop_fewshot.get_config("p4q_w4a4attn8"), coop_fewshot.get_config("p4q_w8a8")]
    for config in configs:
        assert (config.loss.distillation_kind, config.loss.distillation,
                config.loss.teacher) == ("official", 1.0, "zeroshot")
    assert step.LossWeights().distillation_kind == "official"
