"""Everything the config alone decides, checked before the first JAX computation.

A bad field should cost seconds, not the minutes of calibration and evaluation that come
before the code that would otherwise trip on it. `check` makes every path the user gave
absolute (Orbax needs absolute paths, and a job's meaning must not depend on the directory
it runs from), then collects every problem it finds: enum fields, dtype and bit-spec
names, batch sizes against the devices and processes, step counts, input paths that must
exist, a workdir that must be writable, result files of another mode that a run would
overwrite, an export path whose folder is not an export, numbers (every float finite;
known fields in their ranges; seeds), the class prompts' length against the model's
context, and the training batch against the training set where its size is known without
decoding an image. It raises one `ConfigError` naming each field, its value and what is
allowed. Once the workdir is locked, the `check_*` functions refuse what an earlier run
left there and this run would overwrite: checkpoints, results or an export of another
config or run (`RunMismatchError`).
"""

import json
import math
import os
import pathlib
import tempfile

import jax
import ml_collections

from p4q_jax import checkpoint as checkpoint_lib
from p4q_jax import data
from p4q_jax import quant
from p4q_jax import results
from p4q_jax import schema
from p4q_jax.clip import storage as clip_storage
from p4q_jax.clip import architectures
from p4q_jax.clip import model as model_lib
from p4q_jax.clip import tokenizer as tokenizer_lib
from p4q_jax.data import folder as folder_lib
from p4q_jax.p4q import features
from p4q_jax.p4q import losses
from p4q_jax.p4q import prompts
from p4q_jax.p4q import step as step_lib
from p4q_jax.p4q import classifier as classifier_lib
from p4q_jax.p4q import variants

# Fields that hold paths, made absolute by `resolve_paths`.
PATH_FIELDS = ("model.checkpoint", "data.data_dir", "data.manual_dir", "data.folder", "data.root",
               "p4q.export_dir", "speed.cache_dir")
SEED_LIMIT = 2**31  # jax.random.key and tf.data take seeds below it


class ConfigError(ValueError):
    """A config that cannot run; the message lists every field that is wrong."""


def absolute(path):
    """`path` made absolute (`~` expanded); URLs such as gs://bucket/dir are kept."""
    path = str(path)
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(config, workdir):
    """A copy of `config` with every path field absolute, and the absolute workdir."""
    config = config.copy_and_resolve_references()
    for dotted in PATH_FIELDS:
        section, name = dotted.split(".")
        if config[section][name]:
            config[section][name] = absolute(config[section][name])
    if config.loss.teacher not in (None, "zeroshot"):
        config.loss.teacher = absolute(config.loss.teacher)
    return config, pathlib.Path(absolute(workdir))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Problems:
    def __init__(self):
        self.lines = []
        self.fields = set()

    def add(self, field, value, expected):
        self.lines.append(f"{field}={value!r}: {expected}")
        self.fields.add(field)

    def one_of(self, field, value, allowed):
        if value not in allowed:
            self.add(field, value, f"expected one of {list(allowed)}")

    def at_least(self, field, value, low):
        if not _is_int(value) or value < low:
            self.add(field, value, f"expected an integer >= {low}")

    def number(self, field, value, low, high=None, *, low_open=False, high_open=False):
        """A finite number >= low (> low if `low_open`) and <= high (< high if `high_open`)."""
        ok = _is_finite_number(value) and (value > low if low_open else value >= low)
        if high is None:
            allowed = f"{'>' if low_open else '>='} {low}"
        else:
            ok = ok and (value < high if high_open else value <= high)
            allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        if not ok:
            self.add(field, value, f"expected a finite number {allowed}")

    def positive(self, field, value):
        self.number(field, value, 0, low_open=True)

    def parses(self, field, value, parse):
        try:
            parse(value)
        except (ValueError, TypeError, KeyError) as e:
            self.add(field, value, str(e))


def _data_shards(config, problems):
    """Devices along the mesh's `data` axis (None when the mesh fields are invalid)."""
    n = jax.device_count()
    model, data_size = config.mesh.model, config.mesh.data
    problems.at_least("mesh.shard_min_size", config.mesh.shard_min_size, 0)
    if not isinstance(model, int) or model < 1 or n % model:
        problems.add("mesh.model", model, f"expected an integer >= 1 dividing the {n} devices")
        return None
    if data_size == -1:
        return n // model
    if data_size * model != n:
        problems.add("mesh.data", data_size,
                     f"expected -1 or {n // model} (mesh.data x mesh.model = the {n} devices)")
        return None
    return data_size


def _batch(problems, field, value, shards):
    problems.at_least(field, value, 1)
    if not isinstance(value, int) or value < 1 or shards is None:
        return
    processes = jax.process_count()
    if value % shards or value % processes:
        problems.add(field, value, f"expected a multiple of the {shards} data-parallel devices "
                     f"and the {processes} processes")


def _writable_dir(problems, field, path):
    """A directory that takes files, or whose nearest existing ancestor does (a temporary
    file is created there and removed: a read-only mount fails even for root)."""
    path = pathlib.Path(path)
    if "://" in str(path):
        return
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problems.add(field, str(path), f"{existing} is a file, not a directory")
        return
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        problems.add(field, str(path), f"cannot write in {existing} ({e.strerror})")


def _model(config, problems):
    cfg = config.model
    if cfg.checkpoint:
        if "://" not in cfg.checkpoint and not os.path.exists(cfg.checkpoint):
            problems.add("model.checkpoint", cfg.checkpoint, "no such file or directory")
    else:
        problems.one_of("model.name", cfg.name, architectures.NAMED)
    problems.one_of("model.dtype", cfg.dtype, model_lib.DTYPES)
    if cfg.activation is not None:
        problems.one_of("model.activation", cfg.activation, model_lib.ACTIVATIONS)


def _data(config, problems):
    cfg, before = config.data, len(problems.lines)
    problems.one_of("data.name", cfg.name, data.NAMES)
    problems.at_least("data.num_shots", cfg.num_shots, 0)
    if not isinstance(cfg.validation, int) or not 0 <= cfg.validation < 100:
        problems.add("data.validation", cfg.validation, "expected an integer percentage in "
                     "[0, 100)")
    problems.one_of("data.augment", cfg.augment, data.AUGMENTATIONS)
    problems.one_of("data.templates", cfg.templates, data.coop.TEMPLATE_CHOICES)
    problems.one_of("data.subsample", cfg.subsample, data.coop.SUBSAMPLES)
    if cfg.subsample != "all" and not str(cfg.name).startswith(data.coop.PREFIX):
        problems.add("data.subsample", cfg.subsample, "base/new halves are defined for the "
                     "coop/<name> datasets only")
    if cfg.name == "folder" and cfg.folder and not os.path.isdir(cfg.folder):
        problems.add("data.folder", cfg.folder, "no such directory")
    if cfg.manual_dir and "://" not in cfg.manual_dir and not os.path.isdir(cfg.manual_dir):
        problems.add("data.manual_dir", cfg.manual_dir, "no such directory")
    if cfg.name == "synthetic":
        problems.at_least("data.synthetic_classes", cfg.synthetic_classes, 2)
        problems.at_least("data.synthetic_examples", cfg.synthetic_examples, 1)
    problems.at_least("data.shuffle_buffer", cfg.shuffle_buffer, 1)
    problems.at_least("data.shot_seed", cfg.shot_seed, 0)
    if problems.lines[before:]:
        return None
    try:  # class names from the folder listing or TFDS's metadata
        info = data.info_from_config(cfg)
        if cfg.name == "folder":  # every image file's header and every class's images
            splits = (info.train_split, info.test_split)
            folder_lib.check(info.root, splits, folder_lib.class_dirs(info.root, splits))
    except (ValueError, FileNotFoundError) as e:
        problems.add("data.name", cfg.name, str(e))
        return None
    return info


def _training_examples(cfg, info):
    """How many examples the training split has, where that is known without TensorFlow or
    decoding an image (with shots, at most num_shots per class); None where it is not."""
    if info.name.startswith(data.coop.PREFIX):  # the lists already are the few-shot subset
        return len(data.coop.load(info.root, info.name, num_shots=cfg.num_shots,
                                  seed=cfg.shot_seed, subsample=cfg.subsample).train)
    if info.name == "synthetic":
        count = cfg.synthetic_examples
    elif info.name == "folder":
        classes = folder_lib.class_dirs(info.root, (info.train_split, info.test_split))
        count = len(folder_lib.files(info.root, info.train_split, classes)[0])
    else:
        count = None
    if cfg.num_shots:
        most = cfg.num_shots * info.num_classes
        count = most if count is None else min(count, most)
    return count


def _context_length(cfg):
    """The text tower's context length from the named config or the checkpoint's metadata
    (CLIP's 77 for an OpenAI-layout file, whose arrays alone would tell)."""
    if cfg.checkpoint:
        config = clip_storage.config_from_metadata(cfg.checkpoint)
    else:
        config = architectures.get_config(cfg.name)
    return 77 if config is None else config.text.context_length


def _prompt_length(config, info, problems):
    """Every class prompt (`prompts.build`: SOT, the context, the name, ".", EOT) within the
    model's context length (the class names of `info`, or none where the data is wrong)."""
    cfg = config.p4q
    if cfg.ctx_init:
        field, value = "p4q.ctx_init", cfg.ctx_init
        n_ctx = len(tokenizer_lib.Tokenizer().encode(cfg.ctx_init))
        if not n_ctx:
            problems.add(field, value, "has no tokens; expected a phrase such as 'a photo of "
                         "a', or '' for a random context of p4q.n_ctx vectors")
            return
    else:
        field, value = "p4q.n_ctx", cfg.n_ctx
        n_ctx = cfg.n_ctx
    if problems.fields & {field, "p4q.position", "model.checkpoint", "model.name"}:
        return
    try:
        length = _context_length(config.model)
    except clip_storage.CheckpointError as e:
        problems.add("model.checkpoint", config.model.checkpoint, str(e))
        return
    try:
        prompts.build(info.class_names if info is not None else ("",), n_ctx=n_ctx,
                      position=cfg.position, context_length=length)
    except ValueError as e:
        problems.add(field, value, str(e))


def _quant(config, problems, shards, mode):
    cfg = config.quant
    problems.parses("quant.config", cfg.config, quant.QConfig.parse)
    problems.one_of("quant.search_rows", cfg.search_rows, quant.calibration.SEARCH_ROWS)
    problems.one_of("quant.compensation", cfg.compensation, quant.compensation.METHODS)
    if cfg.compensation == "qwt" and mode not in ("ptq", "p4q"):
        problems.add("quant.compensation", cfg.compensation,
                     "applies to --mode=ptq and --mode=p4q only (in the demo: the qwt_p4q "
                     "variant in demo.ablations)")
    elif cfg.compensation == "qwt" and mode == "p4q" and not config.p4q.quantize:
        problems.add("quant.compensation", cfg.compensation,
                     "compensates a quantized model; p4q.quantize is False")
    if cfg.compensation == "qwt" and jax.process_count() > 1:
        problems.add("quant.compensation", cfg.compensation,
                     "QwT's solve reads the calibration activations on one host; run the ptq "
                     f"job in one process, not {jax.process_count()}")
    problems.at_least("quant.calib_batches", cfg.calib_batches, 1)
    _batch(problems, "quant.calib_batch_size", cfg.calib_batch_size, shards)


def _p4q(config, problems, shards, info):
    cfg, tcfg, lcfg = config.p4q, config.train, config.loss
    problems.one_of("p4q.position", cfg.position, prompts.POSITIONS)
    if not cfg.ctx_init:
        problems.at_least("p4q.n_ctx", cfg.n_ctx, 1)
    problems.at_least("p4q.adapter_reduction", cfg.adapter_reduction, 1)
    problems.number("p4q.adapter_ratio", cfg.adapter_ratio, 0, 1)
    if cfg.adapter:
        problems.at_least("p4q.adapter_calib_batches", cfg.adapter_calib_batches, 1)
    if cfg.export_dir:
        _writable_dir(problems, "p4q.export_dir", cfg.export_dir)
    _batch(problems, "train.batch_size", tcfg.batch_size, shards)
    if info is not None and "train.batch_size" not in problems.fields and \
            features.uses_cache(config):
        count = _training_examples(config.data, info)
        if count is not None and tcfg.batch_size > count:
            problems.add("train.batch_size", tcfg.batch_size, f"expected at most the {count} "
                         "training examples (an epoch of the feature cache is whole batches); "
                         "lower it or set speed.feature_cache=False")
    _prompt_length(config, info, problems)
    problems.at_least("train.num_steps", tcfg.num_steps, 0)
    if not tcfg.num_steps:
        problems.at_least("train.epochs", tcfg.epochs, 1)
    problems.at_least("train.warmup_steps", tcfg.warmup_steps, 0)
    if tcfg.num_steps and isinstance(tcfg.warmup_steps, int) and \
            tcfg.warmup_steps >= tcfg.num_steps:
        problems.add("train.warmup_steps", tcfg.warmup_steps,
                     f"expected fewer than train.num_steps={tcfg.num_steps}")
    problems.at_least("train.log_every", tcfg.log_every, 1)
    problems.one_of("train.schedule", tcfg.schedule, step_lib.SCHEDULES)
    problems.at_least("train.warmup_epochs", tcfg.warmup_epochs, 0)
    if tcfg.schedule == "official_stages":
        ends = tuple(tcfg.stage_epochs)
        if not step_lib.valid_stage_epochs(ends):
            problems.add("train.stage_epochs", ends, step_lib.STAGE_EPOCHS_EXPECTED)
        elif not tcfg.num_steps and ends[-1] != tcfg.epochs:
            problems.add("train.stage_epochs", ends,
                         f"the last stage must end at train.epochs={tcfg.epochs}")
    if tcfg.epochs_from_shots and config.data.name != "coop/imagenet" and \
            config.data.num_shots not in step_lib.COOP_EPOCHS:
        problems.add("train.epochs_from_shots", True, "CoOp's epochs are defined for "
                     f"data.num_shots in {sorted(step_lib.COOP_EPOCHS)}, not "
                     f"{config.data.num_shots}")
    problems.number("train.prompt_momentum", tcfg.prompt_momentum, 0, 1, high_open=True)
    problems.number("train.prompt_final_fraction", tcfg.prompt_final_fraction, 0, 1)
    for field in ("warmup_lr", "prompt_weight_decay", "adapter_weight_decay"):
        problems.number(f"train.{field}", tcfg[field], 0)
    for field in ("prompt_lr", "adapter_lr", "adapter_eps", "clip_norm"):
        if tcfg[field] is not None:
            problems.positive(f"train.{field}", tcfg[field])
    problems.one_of("loss.distillation_kind", lcfg.distillation_kind, losses.DISTILLATIONS)
    problems.positive("loss.temperature", lcfg.temperature)
    _teacher(config, problems)
    for field in ("cross_entropy", "distillation", "contrastive"):
        problems.number(f"loss.{field}", lcfg[field], 0)
    problems.at_least("checkpoint.every_steps", config.checkpoint.every_steps, 1)
    problems.at_least("checkpoint.keep", config.checkpoint.keep, 1)
    views = config.speed.feature_cache_views
    problems.at_least("speed.feature_cache_views", views, 0)
    if isinstance(views, int) and views > 0 and config.data.augment == "flip":
        problems.add("speed.feature_cache_views", views, "applies to random crops "
                     "(data.augment='coop'); with 'flip' the cache holds both views exactly")
    if config.speed.cache_dir:
        _writable_dir(problems, "speed.cache_dir", config.speed.cache_dir)
    problems.at_least("speed.length_buckets", config.speed.length_buckets, 1)
    problems.one_of("speed.remat", config.speed.remat,
                    ("off", *model_lib.REMAT_POLICIES))
    problems.one_of("speed.xla_schedule", config.speed.xla_schedule,
                    step_lib.XLA_SCHEDULES)


def _teacher(config, problems):
    teacher = config.loss.teacher
    if teacher == "zeroshot":
        return
    if not teacher:
        problems.add("loss.teacher", teacher, "expected 'zeroshot' or the path of a trained FP "
                     "export (e.g. an FP P4Q run's export/)")
    elif not (pathlib.Path(teacher) / classifier_lib.MARKER).is_file():
        problems.add("loss.teacher", teacher, f"not a P4Q export (no {classifier_lib.MARKER}); "
                     "expected 'zeroshot' or a trained FP run's export/")


def _qat(config, problems):
    """The `qat` section (`configs/qat.py`) and what QAT supports of the P4Q fields."""
    for field in ("lr", "scale_lr"):
        problems.positive(f"qat.{field}", config.qat[field])
    problems.number("qat.weight_decay", config.qat.weight_decay, 0)
    if not config.p4q.quantize:
        problems.add("p4q.quantize", False, "QAT trains a quantized model: expected True")
    if config.p4q.adapter:
        problems.add("p4q.adapter", True, "QAT trains the towers and prompts, no adapter: "
                     "expected False")
    if not config.p4q.train_prompts:
        problems.add("p4q.train_prompts", False, "QAT trains CoOp's prompts: expected True")
    if config.train.schedule != "cosine":
        problems.add("train.schedule", config.train.schedule, "QAT follows P4Q's 'cosine' "
                     "schedule: expected 'cosine'")


def _demo(config, problems):
    demo = config.demo
    qconfigs = list(demo.qconfigs)
    if not qconfigs:
        problems.add("demo.qconfigs", qconfigs, "name at least one bit setting")
    for i, name in enumerate(qconfigs):
        problems.parses(f"demo.qconfigs[{i}]", name, quant.QConfig.parse)
    quantized = [v for v, changes in variants.BASELINES.items()
                 if changes.get("p4q.quantize", True)]  # the demo's FP runs have their flags
    for i, name in enumerate(demo.ablations):
        problems.one_of(f"demo.ablations[{i}]", name, [*variants.ABLATIONS, *quantized])
    if demo.ablations:
        problems.parses("demo.ablation_qconfig", demo.ablation_qconfig, quant.QConfig.parse)
    if "kl_trained_teacher" in demo.ablations and not demo.fp_p4q:
        problems.add("demo.fp_p4q", False, "the kl_trained_teacher ablation distils from the "
                     "FP P4Q run: expected True")
    if not config.p4q.quantize:
        problems.add("p4q.quantize", False, "the demo compares PTQ and P4Q: expected True")


def _finite(config, problems, prefix=""):
    """Every float of the config, at any depth and in tuples, is finite: a NaN or an infinity
    compares False with every bound, so a range check alone would let it through (fields
    already named by a check are not named twice)."""
    for name, value in config.items():
        field = f"{prefix}{name}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            _finite(value, problems, f"{field}.")
        elif field in problems.fields:
            continue
        elif isinstance(value, (tuple, list)):
            if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                problems.add(field, tuple(value), "expected finite numbers")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.add(field, value, "expected a finite number")


def _results_of_another_mode(workdir, mode, problems):
    path = results.file_for(workdir, mode)
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text()).get("mode")
    except (ValueError, AttributeError):
        stored = "<unreadable>"
    if stored != mode:
        problems.add("workdir", str(workdir), f"{path} holds the results of mode {stored!r}, "
                     f"which mode {mode!r} would overwrite; use another --workdir")


def check_schema(config):
    """Refuses (ConfigError) fields and sections the schema does not know, naming the known
    ones nearby, and fields of the schema the config lacks."""
    lines = schema.unknown(config)
    lines += [f"{dotted}: missing; expected every field of the config schema "
              "(p4q_jax/schema.py): build the config from schema.defaults()"
              for dotted in schema.missing(config)]
    if lines:
        raise ConfigError(f"this config has {len(lines)} unknown or missing field(s):\n  "
                          + "\n  ".join(lines))


def check(config, workdir, *, mode):
    """Validates `config` for `mode` -> (config with absolute paths, absolute workdir).

    Raises ConfigError listing every problem. Runs no JAX computation (it asks JAX for the
    device and process counts, which the batch sizes must divide). A config with a field or
    section the schema does not hold (`p4q_jax/schema.py`: a typo nothing would read), or
    without one it holds, is refused first, before any other check."""
    check_schema(config)
    config, workdir = resolve_paths(config, workdir)
    problems = _Problems()
    _writable_dir(problems, "workdir", workdir)
    if workdir.is_dir():
        _results_of_another_mode(workdir, mode, problems)
    shards = _data_shards(config, problems)
    if not _is_int(config.seed) or not 0 <= config.seed < SEED_LIMIT:
        problems.add("seed", config.seed, "expected an integer in [0, 2**31)")
    _model(config, problems)
    info = _data(config, problems)
    _batch(problems, "eval.batch_size", config.eval.batch_size, shards)
    _batch(problems, "eval.text_batch_size", config.eval.text_batch_size, shards)
    if mode in ("ptq", "p4q", "demo", "qat"):
        _quant(config, problems, shards, mode)
        name = str(config.data.name)
        if name.startswith(data.coop.PREFIX) and \
                name.removeprefix(data.coop.PREFIX) in data.coop.TEST_ONLY:
            problems.add("data.name", name, f"a test-only dataset cannot calibrate or train "
                         f"the {mode} job; evaluate an export on it with --mode=eval")
    if mode in ("p4q", "demo", "qat"):
        _p4q(config, problems, shards, info)
        if mode in ("p4q", "qat"):
            _export_path(config, workdir, problems)
    if mode == "qat":
        _qat(config, problems)
    if mode == "demo":
        _demo(config, problems)
    if mode == "eval":
        export = classifier_lib.export_dir(config, workdir)
        if not (export / classifier_lib.MARKER).is_file():
            problems.add("p4q.export_dir", str(export),
                         f"not a P4Q export (no {classifier_lib.MARKER}); train with "
                         "--config=configs/p4q.py first")
    _finite(config, problems)
    if problems.lines:
        raise ConfigError(f"the {mode} job cannot run with this config "
                          f"({len(problems.lines)} problem(s)):\n  " + "\n  ".join(problems.lines))
    return config, workdir


def check_resumable(config, workdir):
    """Raises checkpoint.RunMismatchError if WORKDIR/checkpoints holds a run with another
    fingerprint (skipped with `checkpoint.restart`, which moves that run aside instead)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if config.checkpoint.restart or not directory.is_dir():
        return
    checkpointer = checkpoint_lib.Checkpointer(
        directory, every_steps=1, fingerprint=checkpoint_lib.run_fingerprint(config))
    try:
        checkpointer.check_resumable()
    finally:
        checkpointer.close()


def _export_path(config, workdir, problems):
    """An export replaces its whole folder: not the workdir or a folder holding it, not
    inside the run's checkpoints, and not an existing folder that is not a P4Q export."""
    export = classifier_lib.export_dir(config, workdir)
    if workdir.is_relative_to(export):
        problems.add("p4q.export_dir", str(export), "is the workdir or a folder that holds it; "
                     "the export replaces the whole folder: name a folder of its own, e.g. "
                     f"{workdir / 'export'} (the default)")
    elif export.is_relative_to(workdir / "checkpoints"):
        problems.add("p4q.export_dir", str(export), f"is inside the run's "
                     f"{workdir / 'checkpoints'}; name a folder of its own, e.g. "
                     f"{workdir / 'export'} (the default)")
    elif (export.exists() or export.is_symlink()) and \
            not (export / classifier_lib.MARKER).is_file():
        problems.add("p4q.export_dir", str(export), f"exists and is not a P4Q export (no "
                     f"{classifier_lib.MARKER}), and the export would replace it: name a folder "
                     "that does not exist yet, or move this one away")


def check_export(config, workdir):
    """Refuses (RunMismatchError), before any work, an existing export that the p4q run in
    `workdir` would replace but did not write: another run's (the same run, resumed, may
    rewrite its own). With `checkpoint.restart` the default WORKDIR/export goes aside with
    the old run. (`check` refuses export paths that are no export at all.)"""
    workdir = pathlib.Path(workdir)
    export = classifier_lib.export_dir(config, workdir)
    field = f"p4q.export_dir={str(export)!r}"
    if not (export / classifier_lib.MARKER).is_file():
        return
    if config.checkpoint.restart and export == workdir / "export":
        return
    current = export_writer(config, workdir)
    stored = classifier_lib.writer(export)
    if stored == current:
        return
    restart = " (or pass --config.checkpoint.restart=True to move the old run aside)" \
        if export == workdir / "export" else ""
    afresh = (f"To keep it, name another --config.p4q.export_dir; to replace it, move it "
              f"away first{restart}.")
    if stored is not None and stored.get("workdir") != current["workdir"]:
        raise checkpoint_lib.RunMismatchError(
            f"{field}: holds the export of another run (workdir {stored.get('workdir')}), "
            f"which this run in {workdir} would replace. Nothing was changed. {afresh}")
    raise checkpoint_lib.mismatch(f"{export} holds the export",
                                  None if stored is None else stored.get("fingerprint"),
                                  current["fingerprint"], afresh=afresh)


def export_writer(config, workdir):
    """What a p4q run records in its export (`trained.RUN_FILE`): its workdir and config
    fingerprint, which `check_export` compares."""
    return {"workdir": str(workdir), "fingerprint": checkpoint_lib.run_fingerprint(config)}


def check_results(config, workdir, mode):
    """Refuses (RunMismatchError, listing the fields that differ), before any work, a rerun
    of `mode` whose results file in `workdir` came from another config; the same config may
    rerun. With `checkpoint.restart`, the old file is moved to WORKDIR/previous/<time>/
    instead."""
    path = results.file_for(workdir, mode)
    if not path.is_file():
        return
    if config.checkpoint.restart:
        checkpoint_lib.move_run_aside(workdir, outputs=(path.name,))
        return
    try:
        stored = json.loads(path.read_text()).get("fingerprint")
    except (ValueError, AttributeError):
        stored = None
    current = checkpoint_lib.run_fingerprint(config, mode)
    if stored != current:
        restart = (f", or pass --config.checkpoint.restart=True to move it to "
                   f"{workdir}/previous/")
        raise checkpoint_lib.mismatch(
            f"{path} holds the {mode} results", stored, current,
            afresh=f"To keep them, use another --workdir or move {path} away{restart}.")
