"""P4Q: calibrate (PTQ), then train learned prompts + an 8-bit QAdapter with distillation
from the FP teacher (the public code's loss by default).

    python main.py --config=configs/p4q.py --config.model.checkpoint=ViT-B-32.pt \
        --config.data.name=cifar100 --config.quant.config=w4a4attn8 --workdir=runs/p4q

Writes results.json (FP zero-shot, PTQ and P4Q rows), training_curves.png, TensorBoard
logs, checkpoints/ (a rerun with the same workdir resumes) and export/ (the trained
model, for `--mode=eval` and `p4q.classifier.load`). Baselines and ablations are variants:
`configs/baselines.py:coop_fp`, `configs/ablations.py:adapter_only`, ...
"""

import ml_collections
from ml_collections import config_dict

from p4q_jax.configs import ptq


def get_config():
    config = ptq.get_config()
    config.mode = "p4q"

    config.p4q = ml_collections.ConfigDict()
    config.p4q.method = "p4q"  # the row name in results.json
    config.p4q.quantize = True  # False: train on the FP model (CoOp)
    config.p4q.n_ctx = 16
    config.p4q.ctx_init = ""  # e.g. "a photo of a" (then n_ctx = its token count); "" = N(0, 0.02)
    config.p4q.position = "end"  # class token position: end | middle | front
    config.p4q.class_specific = False
    config.p4q.train_prompts = True  # False: the context stays at its initial value
    config.p4q.adapter = True
    config.p4q.adapter_reduction = 4
    config.p4q.adapter_ratio = 0.2
    config.p4q.adapter_calib_batches = 10  # training batches the frozen 8-bit ranges come from
    config.p4q.export_dir = config_dict.placeholder(str)  # default: WORKDIR/export

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # global
    config.train.epochs = 50
    config.train.num_steps = 0  # > 0 overrides epochs
    config.train.prompt_lr = config_dict.placeholder(float)  # default 5e-4 x batch_size / 20
    config.train.prompt_final_fraction = 1e-3  # cosine decay to this fraction of prompt_lr
    config.train.adapter_lr = 1e-3
    config.train.adapter_eps = 1e-4
    config.train.adapter_weight_decay = 0.01
    config.train.warmup_steps = 0
    # Learning-rate schedule: "cosine" (per step, with warmup_steps), "coop" (CoOp's: per
    # epoch, warmup_epochs at the constant warmup_lr, then cosine over the epochs) or
    # "official_stages" (the public code's resumed stages ending at the epochs of
    # stage_epochs, the last = train.epochs; see step.official_stage_schedules).
    config.train.schedule = "cosine"
    config.train.stage_epochs = ()
    config.train.warmup_epochs = 1
    config.train.warmup_lr = 1e-5
    config.train.prompt_momentum = 0.0  # the prompts' SGD; CoOp: 0.9
    config.train.prompt_weight_decay = 0.0  # PyTorch-style (added to the gradient); CoOp: 5e-4
    # True: CoOp's epochs for data.num_shots (1: 50, 2 and 4: 100, 8 and 16: 200; ImageNet:
    # 50) instead of train.epochs.
    config.train.epochs_from_shots = False
    config.train.clip_norm = config_dict.placeholder(float)
    config.train.log_every = 50

    config.loss = ml_collections.ConfigDict()
    config.loss.cross_entropy = 1.0
    config.loss.distillation = 1.0
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
    config.speed.cache_dir = config_dict.placeholder(str)  # default: WORKDIR/feature_cache
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
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True
    # A rerun resumes only the same run; True moves a previous run's checkpoints, export and
    # results to WORKDIR/previous/<time>/ and starts afresh.
    config.checkpoint.restart = False
    return config
