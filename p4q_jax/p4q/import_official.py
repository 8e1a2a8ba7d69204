"""Imports the public P4Q code's trained files as an export that `main.py --mode=eval` reads.

    python -m p4q_jax.p4q.import_official --adapter=p4q_adapter.pth \
        --prompt_learner=p4q_prompt_learner.pth --checkpoint=ViT-B-32.pt \
        --dataset=cifar100 --data_dir=~/tensorflow_datasets --out=runs/official_export
    python main.py --config=configs/cifar100_vitb32_official448.py --mode=eval \
        --config.p4q.export_dir=runs/official_export --workdir=runs/official_eval

What goes where (HuixinSun/P4Q_official, models/dq_qadapt_coop.py; its files are
`torch.save({"model_state_dict": module.state_dict()})`, read here with the safe reader):

* adapter (`QAdapter`): `fc.in_fc` / `fc.out_fc` are torch Linears (y = x W^T + b), so this
  project's `fc1` / `fc2` kernels are W^T and the biases are kept; reduction = D / rows of
  in_fc. The public code blends `0.2 * adapter(f) + 0.8 * f` (`--adapt_ratio` 0.2), as this
  project's `QAdapter(ratio=0.2)` does.
* prompt learner (`PromptLearner`): `ctx` [1, n_ctx, D] (or [n_ctx, D]) is the shared
  context in "X X ... X {name}." (class name after the context); `token_prefix` and
  `token_suffix` are the frozen token embeddings of those prompts, rebuilt here from the
  dataset's class names, so they are only checked for the class count. On a GPU that code
  never registers `ctx` as a parameter, so its files may lack it; then `--prompt_learner`
  cannot be used and, without it, the context is a fresh N(0, 0.02) draw (`--seed`), the
  kind of untrained context the public evaluation itself runs with.
* towers: `--checkpoint` quantized with the `official` preset and calibrated as its main.py
  does: `--calib_batches` (10) training batches of `--calib_batch_size` (128), flipped, and
  the dataset's zero-shot prompt ensemble.
* the adapter's frozen 8-bit input ranges: observed on the quantized image features of the
  first `--adapter_calib_batches` calibration batches (the public evaluation observes one
  training batch, dq_qadapt_coop.py:584-589).
"""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging

from p4q_jax import clip
from p4q_jax import data
from p4q_jax import quant
from p4q_jax import schema
from p4q_jax.clip import torch_reader
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import classifier as classifier_lib

ADAPTER_KEYS = ("fc.in_fc.weight", "fc.in_fc.bias", "fc.out_fc.weight", "fc.out_fc.bias")
PROMPT_KEYS = ("ctx", "token_prefix", "token_suffix")
RATIO = 0.2  # the public `--adapt_ratio` default, which its scripts keep
N_CTX = 16  # DQ_QACoOp's n_ctx


def _state_dict(path, allowed, *, what):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    state = torch_reader.read_state_dict(path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    unknown = sorted(set(state) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} in a public P4Q {what} state dict; "
                         f"expected only {list(allowed)}")
    return state


def _check_shape(path, key, value, expected):
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected "
                         f"{tuple(expected)}")


def read_adapter(path, *, width):
    """The public QAdapter's state dict -> (QAdapter, its Flax params) for `width`-d features."""
    state = _state_dict(path, ADAPTER_KEYS, what="adapter")
    missing = [k for k in ADAPTER_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; a public P4Q adapter holds "
                         f"{list(ADAPTER_KEYS)}")
    hidden = state["fc.in_fc.weight"].shape[0]
    if not hidden or width % hidden:
        raise ValueError(f"{path}: fc.in_fc.weight has {hidden} rows, which do not divide the "
                         f"model's {width}-d image features")
    for key, shape in zip(ADAPTER_KEYS, [(hidden, width), (hidden,), (width, hidden), (width,)]):
        _check_shape(path, key, state[key], shape)
    f32 = lambda k: np.asarray(state[k], np.float32)  # noqa: E731
    params = {"fc1": {"kernel": f32("fc.in_fc.weight").T, "bias": f32("fc.in_fc.bias")},
              "fc2": {"kernel": f32("fc.out_fc.weight").T, "bias": f32("fc.out_fc.bias")}}
    return adapter_lib.QAdapter(reduction=width // hidden, ratio=RATIO), params


def read_context(path, *, width, num_classes):
    """The public PromptLearner's state dict -> its shared context [n_ctx, width]."""
    state = _state_dict(path, PROMPT_KEYS, what="prompt learner")
    if "ctx" not in state:
        raise ValueError(
            f"{path}: no ctx key (only {sorted(state)}). The public code does not register "
            "ctx as a parameter when it runs on a GPU, so its state dict lacks the context; "
            "import without --prompt_learner, or write the context as a state dict {'ctx': "
            "[1, n_ctx, D]}.")
    ctx = state["ctx"]
    if ctx.ndim == 3 and ctx.shape[0] == 1:
        ctx = ctx[0]
    if ctx.ndim != 2 or ctx.shape[1] != width:
        raise ValueError(f"{path}: ctx has shape {tuple(state['ctx'].shape)}, expected "
                         f"[1, n_ctx, {width}] or [n_ctx, {width}] (the text tower's width)")
    for key in ("token_prefix", "token_suffix"):
        if key in state and state[key].shape[0] != num_classes:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}: prompts "
                             f"of {state[key].shape[0]} classes, but the dataset has "
                             f"{num_classes}")
    return np.asarray(ctx, np.float32)


def import_official(*, adapter_path, prompt_learner_path, checkpoint, data_config, out,
                    calib_batches=10, calib_batch_size=128, adapter_calib_batches=1, seed=0):
    """Reads the public files, calibrates the `official` quantization, writes the export ->
    its absolute path. `data_config`: a `config.data` section (the dataset to calibrate on,
    whose class names the prompts get)."""
    if not 1 <= adapter_calib_batches <= calib_batches:
        raise ValueError(f"adapter_calib_batches={adapter_calib_batches}: expected 1 to "
                         f"calib_batches={calib_batches}")
    model, params = clip.load(checkpoint)
    info = data.info_from_config(data_config)
    adapter, adapter_params = read_adapter(adapter_path, width=model.config.embed_dim)
    if prompt_learner_path:
        context = read_context(prompt_learner_path, width=model.config.text.width,
                               num_classes=len(info.class_names))
    else:
        logging.warning("no --prompt_learner: the context is an untrained N(0, 0.02) draw")
        context = prompts_lib.init_context(jax.random.key(seed), n_ctx=N_CTX,
                                           width=model.config.text.width)
    dataset = data.create_dataset(data_config, split="train", batch_size=calib_batch_size,
                                  image_size=model.config.vision.image_size, train=True,
                                  seed=seed)
    images = [b["image"] for b in itertools.islice(data.as_numpy_batches(dataset),
                                                   calib_batches)]
    texts = [t for class_prompts in data.prompts(info.class_names, info.templates)
             for t in class_prompts]
    qstate = quant.calibrate(model, params, quant.QConfig.parse("official"), images=images,
                             texts=texts, search_rows="last")
    encode = jax.jit(lambda x: clip.encode_image(model, params, x, qstate=qstate))
    adapter_qstate = adapter_lib.calibrate(
        adapter, adapter_params, [encode(x) for x in images[:adapter_calib_batches]],
        search_rows="last")
    trained = classifier_lib.Trained(
        class_names=tuple(info.class_names), position="end", context=jnp.asarray(context),
        adapter=adapter, adapter_params=adapter_params,
        adapter_qstate=jax.device_get(adapter_qstate))
    return classifier_lib.save(out, model, params, jax.device_get(qstate), trained)


def define_flags():
    """The command line's flags (defined only when run as a script: importing this module
    from a notebook or a test registers nothing)."""
    flags.DEFINE_string("adapter", None, "The public code's p4q_adapter.pth.")
    flags.DEFINE_string("prompt_learner", None, "Its p4q_prompt_learner.pth (with a ctx key); "
                        "default: an untrained N(0, 0.02) context.")
    flags.DEFINE_string("checkpoint", None, "The CLIP checkpoint (ViT-B-32.pt, an HF or Orbax "
                        "directory).")
    flags.DEFINE_string("dataset", "cifar100", "The dataset (class names, calibration images), "
                        "as --config.data.name.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_string("out", None, "The export directory to write.")
    flags.DEFINE_integer("calib_batches", 10, "Calibration batches (its --calib-iter).")
    flags.DEFINE_integer("calib_batch_size", 128, "Calibration batch size (its --train_batch).")
    flags.DEFINE_integer("adapter_calib_batches", 1,
                         "Calibration batches the adapter's 8-bit ranges are observed on.")
    flags.DEFINE_integer("seed", 0, "Seed of the calibration batches' order (and of the context "
                         "without --prompt_learner).")
    flags.mark_flags_as_required(["adapter", "checkpoint", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    data_config = schema.defaults().data
    data_config.name = f.dataset
    data_config.data_dir = f.data_dir and str(pathlib.Path(f.data_dir).expanduser())
    path = import_official(
        adapter_path=f.adapter, prompt_learner_path=f.prompt_learner,
        checkpoint=f.checkpoint, data_config=data_config, out=f.out,
        calib_batches=f.calib_batches, calib_batch_size=f.calib_batch_size,
        adapter_calib_batches=f.adapter_calib_batches, seed=f.seed)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
