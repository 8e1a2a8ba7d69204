"""Base config: the fields every job shares, set for a zero-shot run of a random `tiny` CLIP.

With no checkpoint, a randomly initialised `model.name` CLIP is used (a smoke run that says so
in its output: its accuracy is chance). The job configs (`zeroshot.py`, `ptq.py`, `p4q.py`,
`default.py`, ...) load this file and change a few fields; every field can be overridden from
the command line, e.g. `--config.data.name=cifar100 --config.model.checkpoint=ViT-B-32.pt`.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.mode = "zeroshot"
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    # OpenAI .pt, Hugging Face dir, or Orbax dir; unset = random init of `model.name`.
    config.model.checkpoint = config_dict.placeholder(str)
    config.model.name = "tiny"
    config.model.dtype = "float32"  # computation dtype: float32 | bfloat16
    config.model.activation = config_dict.placeholder(str)  # OpenAI-layout override

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"  # shapes | cifar10 | ... | folder | coop/<name> | synthetic
    config.data.data_dir = config_dict.placeholder(str)
    config.data.manual_dir = config_dict.placeholder(str)
    config.data.folder = config_dict.placeholder(str)  # root of a folder dataset
    config.data.root = config_dict.placeholder(str)  # $DATA of the coop/<name> datasets
    config.data.templates = "coop"  # coop/<name> prompts: "coop" (CoOp's one) | "clip" (ensemble)
    config.data.subsample = "all"  # coop/<name> classes: all | base | new (CoCoOp's halves)
    config.data.num_shots = 0  # k-shot per class for training; 0 = full training set
    config.data.shot_seed = 1  # the k-shot draw's seed (coop/<name>: CoOp's --seed)
    config.data.flip = True  # random horizontal flips in training
    config.data.augment = "flip"  # training views: "flip" (center crop) | "coop" (random crop)
    config.data.shuffle_buffer = 10_000
    # > 0: hold out this percentage of the training split and evaluate every row on it
    # instead of the test split (to choose hyper-parameters; TFDS datasets with one
    # training split). The held-out images are never trained or calibrated on.
    config.data.validation = 0
    config.data.synthetic_classes = 10
    config.data.synthetic_examples = 64

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 64  # global; the last batch is padded and masked
    config.eval.text_batch_size = 128

    config.quant = ml_collections.ConfigDict()
    config.quant.config = "w4a4attn8"  # official | w{W}a{A}[attn{S}] (see p4q_jax/quant/qconfig.py)
    config.quant.calib_batches = 2  # training batches the image tower is calibrated on
    # (the balanced search reads the same images in passes of eval.batch_size where that
    # divides calib_batch_size: its scales do not depend on the batching)
    config.quant.calib_batch_size = 32
    # Rows OMSE/PTF score their clipping candidates on: "balanced" (an equal share of every
    # calibration image and prompt), "last" (the final batch, as the public P4Q code), or
    # "auto" ("last" for quant.config='official', else "balanced").
    config.quant.search_rows = "auto"
    # Inference (PTQ and trained-model evaluation, the feature cache, --mode=eval) on int8
    # x int8 -> int32 products where the config allows (p4q_jax/quant/integer.py): None
    # (default) where this machine's int8 dot is faster (GPUs, TPUs, CPUs with AVX-512 VNNI
    # or AMX), True / False to force it. Training always runs fake-quant (STE gradients).
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
    config.mesh.model = 1
    # Frozen arrays of at least this many entries are split over `model` (when it is > 1)
    # along their last dimension; smaller ones are replicated (parallel.weight_shardings).
    config.mesh.shard_min_size = 2**16

    # Multi-host: set coordinator_address (+ num_processes, process_id), or `auto` on
    # TPU pods / SLURM where jax.distributed.initialize() finds them itself.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.auto = False
    config.distributed.coordinator_address = config_dict.placeholder(str)
    config.distributed.num_processes = config_dict.placeholder(int)
    config.distributed.process_id = config_dict.placeholder(int)
    return config
