"""The config schema: every field of every job's config, with its default, defined once.

`defaults()` is the whole config (a zero-shot run of a random `tiny` CLIP); the experiment
configs (`p4q_jax/configs/`) start from it and change only what differs, and the library
reads every field directly. Every config holds every section; each mode reads the sections
it needs (`zeroshot`: model, data, eval, mesh, distributed and checkpoint.restart; `ptq`
adds quant; `p4q` adds p4q, train, loss, speed, checkpoint; `eval` p4q.export_dir; `demo`
adds demo), and preflight checks those. A field whose default is None
(`config_dict.placeholder`) is optional: None means "not given", and its comment says what
is used then. `unknown` names the fields of a config that the schema does not hold (a
typo would otherwise be ignored: nothing reads it), `missing` those it lacks.
"""

import difflib

import ml_collections
from ml_collections import config_dict


def defaults():
    """A new ConfigDict holding every field at its default."""
    config = ml_collections.ConfigDict()
    config.mode = "zeroshot"  # zeroshot | ptq | p4q | qat | eval | demo (--mode overrides)
    config.seed = 0  # random init, calibration draw, prompts/adapter init, batch order

    config.model = ml_collections.ConfigDict()
    # Optional: an OpenAI .pt, Hugging Face dir or Orbax dir; None: random init of `name`.
    config.model.checkpoint = config_dict.placeholder(str)
    config.model.name = "tiny"  # the architecture a run without a checkpoint initialises
    config.model.dtype = "float32"  # computation dtype: float32 | bfloat16
    # Optional: an OpenAI-layout checkpoint's activation; None: the file's own.
    config.model.activation = config_dict.placeholder(str)

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"  # shapes | cifar10 | ... | folder | coop/<name> | synthetic
    config.data.data_dir = config_dict.placeholder(str)  # optional: TFDS data_dir
    config.data.manual_dir = config_dict.placeholder(str)  # optional: TFDS manual_dir
    config.data.folder = config_dict.placeholder(str)  # optional: root of a folder dataset
    config.data.root = config_dict.placeholder(str)  # optional: $DATA of coop/<name> datasets
    config.data.templates = "coop"  # coop/<name> prompts: "coop" (CoOp's one) | "clip" (ensemble)
    config.data.subsample = "all"  # coop/<name> classes: all | base | new (CoCoOp's halves)
    config.data.num_shots = 0  # k-shot per class for training; 0 = full training set
    config.data.shot_seed = 1  # the k-shot draw's seed (coop/<name>: CoOp's --seed)
    config.data.flip = True  # random horizontal flips in training
    config.data.augment = "flip"  # training views: "flip" (center crop) | "coop" (random crop)
    config.data.shuffle_buffer = 10_000  # tf.data shuffle buffer of the training stream
    # > 0: hold out this percentage of the training split and evaluate every row on it
    # instead of the test split (to choose hyper-parameters; TFDS datasets with one
    # training split). The held-out images are never trained or calibrated on.
    config.data.validation = 0
    config.data.synthetic_classes = 10  # data.name="synthetic": its classes
    config.data.synthetic_examples = 64  # data.name="synthetic": its examples per split

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 64  # global; the last batch is padded and masked
    config.eval.text_batch_size = 128  # prompts per text-tower batch (global)

    config.quant = ml_collections.ConfigDict()
    config.quant.config = "w4a4attn8"  # official | w{W}a{A}[attn{S}] (see p4q_jax/quant/qconfig.py)
    config.quant.calib_batches = 2  # training batches the image tower is calibrated on
    # Images per calibration batch (the balanced search reads the same images in passes of
    # eval.batch_size where that divides it: its scales do not depend on the batching).
    config.quant.calib_batch_size = 32
    # Rows OMSE/PTF score their clipping candidates on: "balanced" (an equal share of every
    # calibration image and prompt), "last" (the final batch, as the public P4Q code), or
    # "auto" ("last" for quant.config='official', else "balanced").
    config.quant.search_rows = "auto"
    # Optional: inference (PTQ and trained-model evaluation, the feature cache, --mode=eval)
    # on int8 x int8 -> int32 products where the config allows (p4q_jax/quant/integer.py):
    # None where this machine's int8 dot is faster (GPUs, TPUs, CPUs with AVX-512 VNNI or
    # AMX), True / False to force it. Training always runs fake-quant (STE gradients).
    config.quant.integer = config_dict.placeholder(bool)
    # ResNets: fold BatchNorm into the conv kernels before weight quantization (what an
    # integer deployment runs); False keeps it in float after the quantized conv, as the
    # public P4Q code does.
    config.quant.fold_batchnorm = False
    # "qwt": the ptq job also solves QwT's closed-form per-block linear compensation of the
    # ViT blocks (p4q_jax/quant/compensation.py) on the calibration data and adds a "qwt"
    # row; "none" (default): PTQ alone.
    config.quant.compensation = "none"

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by `model`
    config.mesh.model = 1  # devices the large frozen arrays are split over
    # Frozen arrays of at least this many entries are split over `model` (when it is > 1)
    # along their last dimension; smaller ones are replicated (parallel.weight_shardings).
    config.mesh.shard_min_size = 2**16

    # Multi-host: set coordinator_address (+ num_processes, process_id), or `auto` on
    # TPU pods / SLURM where jax.distributed.initialize() finds them itself.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.auto = False  # jax.distributed.initialize() with no arguments
    config.distributed.coordinator_address = config_dict.placeholder(str)  # optional: host:port
    config.distributed.num_processes = config_dict.placeholder(int)  # optional (with the address)
    config.distributed.process_id = config_dict.placeholder(int)  # optional (with the address)

    config.p4q = ml_collections.ConfigDict()
    config.p4q.method = "p4q"  # the row name in results.json
    config.p4q.quantize = True  # False: train on the FP model (CoOp)
    config.p4q.n_ctx = 16  # learned context vectors (with ctx_init "")
    config.p4q.ctx_init = ""  # e.g. "a photo of a" (then n_ctx = its token count); "" = N(0, 0.02)
    config.p4q.position = "end"  # class token position: end | middle | front
    config.p4q.class_specific = False  # one context per class instead of one shared
    config.p4q.train_prompts = True  # False: the context stays at its initial value
    config.p4q.adapter = True  # train the 8-bit QAdapter on the image features
    config.p4q.adapter_reduction = 4  # the adapter's bottleneck: width / reduction
    config.p4q.adapter_ratio = 0.2  # ratio x adapter(f) + (1 - ratio) x f
    config.p4q.adapter_calib_batches = 10  # training batches the frozen 8-bit ranges come from
    config.p4q.export_dir = config_dict.placeholder(str)  # optional; None: WORKDIR/export

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # global
    config.train.epochs = 50  # unless num_steps or epochs_from_shots
    config.train.num_steps = 0  # > 0 overrides epochs
    # Optional: the prompts' learning rate; None: the public code's 5e-4 x batch_size / 20.
    config.train.prompt_lr = config_dict.placeholder(float)
    config.train.prompt_final_fraction = 1e-3  # cosine decay to this fraction of prompt_lr
    config.train.adapter_lr = 1e-3  # the adapter's AdamW
    config.train.adapter_eps = 1e-4  # the adapter's AdamW epsilon
    config.train.adapter_weight_decay = 0.01  # the adapter's AdamW (PyTorch-style) decay
    config.train.warmup_steps = 0  # linear warm-up of schedule="cosine"
    # Learning-rate schedule: "cosine" (per step, with warmup_steps), "coop" (CoOp's: per
    # epoch, warmup_epochs at the constant warmup_lr, then cosine over the epochs) or
    # "official_stages" (the public code's resumed stages ending at the epochs of
    # stage_epochs, the last = train.epochs; see step.official_stage_schedules).
    config.train.schedule = "cosine"
    config.train.stage_epochs = ()  # schedule="official_stages": each stage's last epoch
    config.train.warmup_epochs = 1  # schedule="coop": epochs at warmup_lr
    config.train.warmup_lr = 1e-5  # schedule="coop": the constant warm-up rate
    config.train.prompt_momentum = 0.0  # the prompts' SGD; CoOp: 0.9
    config.train.prompt_weight_decay = 0.0  # PyTorch-style (added to the gradient); CoOp: 5e-4
    # True: CoOp's epochs for data.num_shots (1: 50, 2 and 4: 100, 8 and 16: 200; ImageNet:
    # 50) instead of train.epochs.
    config.train.epochs_from_shots = False
    config.train.clip_norm = config_dict.placeholder(float)  # optional; None: no clipping
    config.train.log_every = 50  # steps between logged metric means

    config.loss = ml_collections.ConfigDict()
    config.loss.cross_entropy = 1.0  # weight of the labels' cross-entropy
    config.loss.distillation = 1.0  # weight of the distillation term
    # "official" (the public code's cross_entropy(teacher_probs, student_probs); the paper's
    # released results), "kl" (KL(teacher || student) at `temperature`) or "none".
    config.loss.distillation_kind = "official"
    config.loss.temperature = 1.0  # kl only
    # The teacher's logits: "zeroshot" (the FP CLIP's zero-shot classifier, the paper's) or
    # the path of a trained full-precision export of the same model, classes and training
    # data (a CoOp-FP or FP P4Q run's export/), whose prompts and adapter give the logits.
    config.loss.teacher = "zeroshot"
    config.loss.contrastive = 0.0  # symmetric image/class-prompt term

    # docs/design.md, "Speed rules (where the time goes)"; each off gives the same training,
    # slower.
    config.speed = ml_collections.ConfigDict()
    config.speed.feature_cache = True  # cached student/teacher image features (flip-only aug.)
    # > 0 with data.augment="coop": cache this many random crops per image (an approximation).
    config.speed.feature_cache_views = 0
    config.speed.cache_dir = config_dict.placeholder(str)  # optional; None: WORKDIR/feature_cache
    config.speed.crop_text = True  # text tower on max_eot + 1 positions, not 77
    config.speed.shared_prefix = True  # the context prefix encoded once for all classes
    # With crop_text: the classes in at most this many groups, each padded only to its own
    # longest prompt (1: all to the longest class name).
    config.speed.length_buckets = 4
    # Recompute the text blocks in the backward pass instead of saving their activations:
    # "off", "blocks" (save nothing) or "dots" (save the matmul outputs). Same loss and
    # gradients, less memory: for many classes (ImageNet's 1,000) or a wide text tower.
    config.speed.remat = "off"
    # XLA:CPU's schedule of the train step: "concurrency" (XLA's default: faster for a few
    # classes), "memory" (ImageNet scale: less memory, and what makes remat pay), or
    # "auto": memory from 500 classes on or with remat (`step.xla_schedule`).
    config.speed.xla_schedule = "auto"

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # steps between training checkpoints
    config.checkpoint.keep = 3  # the latest checkpoints kept
    config.checkpoint.async_save = True  # save in the background while training goes on
    # A rerun resumes only the same run; True moves a previous run's checkpoints, export and
    # results to WORKDIR/previous/<time>/ and starts afresh.
    config.checkpoint.restart = False

    # --mode=qat (configs/qat.py, p4q_jax/qat.py): the whole quantized CLIP fine-tuned with
    # LSQ step sizes plus CoOp's prompts (`train.prompt_lr`), on P4Q's loss, data and steps.
    config.qat = ml_collections.ConfigDict()
    # AdamW on every parameter of both towers: CLIP fine-tuning's usual rate and decay
    # (e.g. WiSE-FT and FLYP fine-tune CLIP ViTs at 1e-5 with weight decay 0.1).
    config.qat.lr = 1e-5
    # Adam on the weight and activation steps (LSQ trains them at the weights' rate; their
    # gradients are already scaled by 1 / sqrt(N * Qp)).
    config.qat.scale_lr = 1e-5
    config.qat.weight_decay = 0.1  # the towers' only; none on the steps

    # --mode=demo (configs/default.py): which p4q runs it makes, in one process.
    config.demo = ml_collections.ConfigDict()
    config.demo.qconfigs = ("w8a8", "w4a4attn8")  # bit settings: PTQ and P4Q at each
    config.demo.coop_fp = True  # CoOp on the FP model
    config.demo.fp_p4q = False  # prompts + adapter on the FP model (the trained teacher)
    config.demo.ablations = ()  # variants (p4q/variants.py) run at ablation_qconfig
    config.demo.ablation_qconfig = "w4a4attn8"  # the bits the ablations run at
    config.demo.qat = False  # QAT at ablation_qconfig (the qat mode; configs/methods.py)
    return config


def _fields(config, prefix=""):
    """{dotted name: value} of every field of `config` (sections are not fields)."""
    out = {}
    for name, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_fields(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _sections(config):
    return sorted(name for name, value in config.items()
                  if isinstance(value, (ml_collections.ConfigDict, dict)))


def _did_you_mean(name, known, prefix=""):
    close = difflib.get_close_matches(name, known, n=3)
    return f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""


def describe_unknown(dotted):
    """Why `dotted` (e.g. "train.lr_typo"; "trian." for a section, "seeed" for a top-level
    name) is not in the schema, naming the known names nearby; None if the schema holds it."""
    schema = defaults()
    sections = _sections(schema)
    section, dot, name = dotted.partition(".")
    if not dot:  # a top-level name: a field (mode, seed) or a section
        if section in schema:
            return None
        top = sorted(schema.keys())
        return (f"{section}: neither a field nor a section of the config schema "
                f"(p4q_jax/schema.py); {_did_you_mean(section, top)}its top level: "
                f"{', '.join(top)}")
    if section not in sections:
        return (f"{section}: not a section of the config schema (p4q_jax/schema.py); "
                f"{_did_you_mean(section, sections)}its sections: {', '.join(sections)}")
    names = sorted(schema[section].keys())
    if name in names:
        return None
    return (f"{dotted}: not a field of section {section!r} in the config schema "
            f"(p4q_jax/schema.py); {_did_you_mean(name, names, section + '.')}its fields: "
            f"{', '.join(names)}")


def unknown(config):
    """A line per field or section of `config` that the schema does not hold, naming the
    known names nearby (an unknown section once, not each of its fields); [] if none."""
    schema = defaults()
    lines = [describe_unknown(f"{name}." if name in _sections(config) else name)
             for name in config.keys() if name not in schema]
    for section in _sections(config):
        if section in schema:
            lines += [describe_unknown(f"{section}.{name}") for name in config[section].keys()
                      if name not in schema[section]]
    return lines


def missing(config):
    """The schema's dotted fields that `config` lacks (a config not built from `defaults()`)."""
    have = _fields(config)
    return [dotted for dotted in _fields(defaults()) if dotted not in have]
