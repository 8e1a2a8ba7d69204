"""PTQ of a CLIP (random weights; ViT-B/32 by default): calibration time, quantized
throughput, export size.

    python benchmarks/ptq.py [--model=RN50] [--configs=w8a8,w6a6,w4a4attn8] [--image_batch=32] \
        [--text_batch=256] [--fold_batchnorm] [--search_rows=auto|balanced|last]

A ResNet's random init has identity BatchNorms; they get checkpoint-like statistics here
(scale U(0.5, 1.5), bias and mean N(0, 0.1), variance U(0.5, 2)) so that folding has something
to fold. With `--fold_batchnorm` every BatchNorm is folded into its conv before calibration
(`quant.fold_batchnorm`); cosines are always to the unfolded FP model.

Calibration follows the P4Q set-up: the text tower on CIFAR-100's zero-shot ensemble
(100 classes x 18 templates), the image tower on 2 batches of 32, and the FP teacher's
ensemble text features come out of the same pass; `--search_rows` picks where OMSE/PTF
draw their rows (every sample, or the final batch as the public code). Times include
compilation. The cosines are to the FP model on held-out images and the first
`--text_batch` prompts.

The int8 path (`quant.integer`: int8 x int8 -> int32 products for every layer whose input
is quantized per tensor; on accelerators the attention products too) is checked against
fake-quant: the smallest cosine between their features over the batch, and the largest
difference (0: the same features bit for bit, as both sum the same integer codes).

Throughput: every encoder (float32, then each preset's fake-quant and int8 states) is
warmed up, then timed one call at a time in interleaved rounds, the order reversed
every other round. Each encoder's median call is reported, and its speed relative to
float32 as the median of per-round ratios (each paired with float32's call in the same
round), with their range. Load that drifts during the run then hits every encoder alike
(on a shared 2-core machine two back-to-back runs of the same call can differ by 20%).
Prompts are cropped after the last EOT, as in training.
"""

import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from flax import traverse_util

import host
from p4q_jax import clip
from p4q_jax import data
from p4q_jax import evaluate
from p4q_jax import quant
from p4q_jax.quant import calibration
from p4q_jax.quant import export
from p4q_jax.quant import fold
from p4q_jax.quant import integer

_MODEL = flags.DEFINE_string("model", "ViT-B/32", "Named CLIP config.")
_CONFIGS = flags.DEFINE_list("configs", ["w8a8", "w6a6", "w4a4attn8"], "Quantization presets.")
_IMAGE_BATCH = flags.DEFINE_integer("image_batch", 32, "Images per call.")
_TEXT_BATCH = flags.DEFINE_integer("text_batch", 256, "Prompts per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timed rounds after one warm-up call.")
_FOLD = flags.DEFINE_bool("fold_batchnorm", False, "Fold a ResNet's BatchNorms into its convs.")
_SEARCH_ROWS = flags.DEFINE_enum("search_rows", "auto", ["auto", "balanced", "last"],
                                 "Rows OMSE/PTF search on (quant.calibrate's search_rows).")


def _seconds(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _throughput(model, params, images, tokens, states):
    """Prints images/s and prompts/s per {label: qstate}, timed in interleaved rounds."""
    calls = {label: (lambda s=state: clip.encode_image(model, params, images, qstate=s),
                     lambda s=state: clip.encode_text(model, params, tokens, qstate=s))
             for label, state in states.items()}
    for fns in calls.values():
        for fn in fns:
            _seconds(fn)
    times = {label: ([], []) for label in calls}
    for r in range(_ROUNDS.value):
        for label in list(calls)[:: 1 if r % 2 == 0 else -1]:
            for fn, out in zip(calls[label], times[label]):
                out.append(_seconds(fn))
    print(f"throughput (median of {_ROUNDS.value} interleaved rounds, batch {len(images)} images / "
          f"{len(tokens)} prompts; ratio to float32: median [min, max] of the per-round ratios):")
    base = [np.asarray(t) for t in next(iter(times.values()))]
    for label, timed in times.items():
        cells = []
        for t, fp, n, unit in zip(map(np.asarray, timed), base, (len(images), len(tokens)),
                                  ("images/s", "prompts/s")):
            ratio = fp / t
            cells.append(f"{n / np.median(t):9.1f} {unit} ({np.median(ratio):.2f}x "
                         f"[{ratio.min():.2f}, {ratio.max():.2f}])")
        print(f"  {label:<24} " + "  ".join(cells))


def _cosine(pair):
    """The smallest per-row cosine between two feature batches."""
    a, b = (np.asarray(evaluate.normalize(x), np.float64) for x in pair)
    return float(np.min(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


def _checkpoint_like_batch_norms(params):
    rng = np.random.default_rng(1)
    draw = {"scale": lambda n: rng.uniform(0.5, 1.5, n), "bias": lambda n: rng.normal(0, 0.1, n),
            "mean": lambda n: rng.normal(0, 0.1, n), "var": lambda n: rng.uniform(0.5, 2.0, n)}
    flat = traverse_util.flatten_dict(params, sep="/")
    for bn in fold.batch_norm_paths(params):
        for leaf, sample in draw.items():
            flat[f"{bn}/{leaf}"] = sample(flat[f"{bn}/{leaf}"].shape[0]).astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def main(argv):
    del argv
    print(f"{host.describe()}, model {_MODEL.value}")
    model, params = clip.init(_MODEL.value)
    if model.config.vision.is_resnet:
        params = _checkpoint_like_batch_norms(params)
    info = data.get_info("cifar100")
    texts = [t for c in data.prompts(info.class_names, info.templates) for t in c]
    size = model.config.vision.image_size
    rng = np.random.default_rng(0)
    calib = [rng.normal(size=(32, size, size, 3)).astype(np.float32) for _ in range(2)]
    images = rng.normal(size=(_IMAGE_BATCH.value, size, size, 3)).astype(np.float32)
    tokens = clip.crop_to_eot(clip.tokenize(texts[: _TEXT_BATCH.value]))
    fp_img = np.asarray(clip.encode_image(model, params, images))
    fp_txt = np.asarray(clip.encode_text(model, params, tokens))
    if _FOLD.value:
        params = quant.fold_batchnorm(params)

    states = {"float32": None}
    for name in _CONFIGS.value:
        start = time.perf_counter()
        qstate, teacher = quant.calibrate(model, params, name, images=calib, texts=texts,
                                          return_text_features=True,
                                          search_rows=_SEARCH_ROWS.value)
        evaluate.ensemble(teacher, num_classes=len(info.class_names)).block_until_ready()
        seconds = time.perf_counter() - start
        cos = [float(np.mean(np.sum(evaluate.normalize(a) * evaluate.normalize(b), -1)))
               for a, b in ((fp_img, clip.encode_image(model, params, images, qstate=qstate)),
                            (fp_txt, clip.encode_text(model, params, tokens, qstate=qstate)))]
        rows = calibration.resolve_search_rows(_SEARCH_ROWS.value, qstate.config)
        print(f"{name} ({rows} search rows): calibration + FP teacher text features "
              f"{seconds:.1f} s "
              f"({len(texts)} prompts, {len(calib)}x{len(calib[0])} images); "
              f"cosine to FP: image {cos[0]:.4f}, text {cos[1]:.4f}")
        states[f"{name} fake-quant"] = qstate
        try:
            int_state = integer.integer_state(qstate, params)
        except ValueError as e:  # per-channel activations (official) have no integer path
            print(f"  no int8 path: {e}")
        else:
            states[f"{name} int8"] = int_state
            pairs = [[np.asarray(clip.encode_image(model, params, images, qstate=s))
                      for s in (qstate, int_state)],
                     [np.asarray(clip.encode_text(model, params, tokens, qstate=s))
                      for s in (qstate, int_state)]]
            cos = [_cosine(pair) for pair in pairs]
            diff = [float(np.abs(a - b).max()) for a, b in pairs]
            print(f"  int8 path ({len(int_state.kernels)} integer layers): cosine to "
                  f"fake-quant, min over images {cos[0]:.6f}, over prompts {cos[1]:.6f}; "
                  f"largest feature difference {diff[0]:.1e} / {diff[1]:.1e}")
        with tempfile.TemporaryDirectory() as tmp:
            sizes = export.save(f"{tmp}/q", model, params, qstate)
        print(f"  export: quantized kernels {sizes['integer_bytes'] / 2**20:.1f} MiB on disk vs "
              f"{sizes['fp32_bytes'] / 2**20:.1f} MiB float32 "
              f"({100 * sizes['integer_bytes'] / sizes['fp32_bytes']:.1f}%)")
    _throughput(model, params, images, tokens, states)


if __name__ == "__main__":
    app.run(main)
