"""P4Q on CIFAR-100, ViT-B/32: the public code's recipe for its "4-4-8" result, field by field.

    python main.py --config=configs/cifar100_vitb32_official448.py \
        --config.model.checkpoint=ViT-B-32.pt --config.data.data_dir=~/tensorflow_datasets \
        --workdir=runs/cifar100_vitb32_official448

Targets the public numbers (github.com/HuixinSun/P4Q_official, checkpoints/README.md): FP
zero-shot 65.34 top-1, PTQ (OMSE) 46.05, P4Q 69.20. Against that code (commit bcd6a87;
`dq` = models/dq_qadapt_coop.py), run by scripts/train_p4q.sh:

* quant.config="official": `--quant --bit_type 4` quantizes 4-bit only the patch conv and
  its input, 8-bit everything else (config.py; site by site in p4q_jax/quant/qconfig.py).
* quant.calib_batches=10 x calib_batch_size=128: `--calib-iter 10` batches of the shuffled,
  flipped training loader, whose batch is `--train_batch 128` (main.py:298-304, 332-337;
  `--calib-batchsize` is never read); OMSE scores the last one (main.py:395-401), hence
  quant.search_rows="last". The text tower sees the 100 x 18 zero-shot ensemble
  (`--zeroshot_prompt`, main.py:351-362), in chunks whose last (its search rows) holds the
  last class's prompts.
* data: the full training set (build_dataset ignores n_shot, dataset/
  build_dataset_allsample.py:82-94), center crop + random flips (`--aug flip`).
* train.batch_size=128; prompts SGD at 5e-4 x 128 / 20 (dq:449, 487), no momentum,
  `--wd 0.0`; adapter AdamW lr 1e-3, eps 1e-4, PyTorch's weight decay 0.01 (dq:494).
* train.prompt_final_fraction=1e-3: the prompts' cosine ends at lr x 1e-3
  (models/utils.py build_cosine_scheduler); the adapter's ends at 0 (CosineAnnealingLR).
* loss: cross-entropy + `F.cross_entropy(softmax(teacher), softmax(student))`, weights 1 and
  1 (dq:535-543): distillation_kind="official".
* p4q: 16 context vectors N(0, 0.02) before the class name (dq:70-72, 101-105, 444), adapter
  reduction 4 and `0.2 * adapter(f) + 0.8 * f` (`--adapt_ratio` 0.2, dq:370-371, 398-400):
  the defaults of configs/p4q.py.
* train.schedule="official_stages", stage_epochs=(1, 5, 10, 20, 50, 100), epochs=100:
  train_p4q.sh runs main.py six times, `--coop_epochs E --adapter_epochs E
  --resume_checkpoint R` with (E, R) = (1, 0), (5, 1), (10, 5), (20, 10), (50, 20),
  (100, 50). Each run re-seeds (main.py:285), recalibrates the same batches, resumes only the
  prompt learner's and adapter's weights (`model_state_dict`, dq:497-501; optimizer and
  scheduler states are never saved, dq:21-27), builds a new SGD whose cosine spans E epochs
  and is indexed by the global iteration (dq:487-491, 522-523), a new AdamW (fresh moments
  and step count) with a new CosineAnnealingLR over E epochs stepped from 0 (dq:494-495,
  552), and trains epochs R..E-1 (dq:520). Here: one run whose learning rates follow
  `step.official_stage_schedules` and whose optimizer moments restart at each stage
  boundary (`step.reset_at`).

Not reproduced: each public stage re-seeds its loader, so every stage's first epoch repeats
the order of the run's first (here the order is fixed by seed and step); an epoch there is
391 batches, the last of 80 images (here 390 full ones); the adapter's 8-bit input ranges
are observed during the last 10% of the last epoch while its weights still change
(dq:565-568; here after training, see p4q/adapter.py); and its prompt context, not
registered as a parameter on a GPU, never trains (docs/design.md, "Where this project
departs from the public code"; here it does). As published,
the script's first two stages save nothing (`--save_freq 10`, dq:571), so the second finds no
epoch_1 files unless the save directory holds p4q_*.pth, which `resolve_checkpoint_paths`
(dq:38-46) then prefers for every stage; this config follows the intended chain, each stage
from the previous one's weights.
"""

from p4q_jax.configs import p4q

# train_p4q.sh's stages: the epoch each run of main.py ends at (`--coop_epochs`).
STAGE_EPOCHS = (1, 5, 10, 20, 50, 100)


def get_config():
    config = p4q.get_config()
    config.model.name = "ViT-B/32"
    config.data.name = "cifar100"
    config.quant.config = "official"
    config.quant.search_rows = "last"
    config.train.schedule = "official_stages"
    config.train.stage_epochs = STAGE_EPOCHS
    config.train.epochs = STAGE_EPOCHS[-1]
    return config
