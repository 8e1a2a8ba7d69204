"""Calibration: FP params + image batches + texts -> a QState (a pure function).

Observers see the full-precision activations (as in FQ-ViT and the public P4Q code).
The image tower sees the given image batches, the text tower the given prompts (the
dataset's zero-shot ensemble), in chunks cropped after the last end-of-text token of all
of them. Each tower's statistics are folded over its batches. The search-based observers
(OMSE, PTF) score their candidates on rows of the data: by default an equal share drawn
from every sample as its batch passes, or (`search_rows="last"`, the public code's way)
the rows of the final batch, returned by one last pass. Each site's search then runs as
its own jitted call, compiled once per distinct (spec, shape) and at XLA's default
optimization level (`SEARCH_COMPILER_OPTIONS`). A tower has a handful of those, so this
compiles far less than one program holding every site's search (docs/results.md,
"Smaller measurements behind design choices"). Weights are calibrated and fake-quantized
once, here.
"""

from collections import abc
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax import clip
from p4q_jax.clip import model as model_lib
from p4q_jax.quant import diagnostics
from p4q_jax.quant import observers
from p4q_jax.quant import primitives
from p4q_jax.quant import qconfig as qconfig_lib
from p4q_jax.quant import sites
from p4q_jax.quant import state as state_lib


def _site_specs(qconfig, model, params, method, example, prefix=""):
    """{site: spec} for the activation sites under `prefix` that the config quantizes."""
    found = {}

    def record(kind, name, x):
        spec = qconfig.spec(kind, name)
        if spec is not None and spec.observer != "log2" and name.startswith(prefix):
            found[name] = spec
        return x

    with sites.intercept(record):
        jax.eval_shape(functools.partial(model.apply, method=method), {"params": params}, example)
    return found


SEARCH_ROWS = ("auto", "balanced", "last")


def resolve_search_rows(search_rows, qconfig):
    """Where OMSE/PTF draw their rows: "balanced" (an equal share of every calibration
    sample) or "last" (the final batch, as FQ-ViT and the public P4Q code); "auto" is "last"
    for the `official` preset, which reproduces the public code, and "balanced" otherwise."""
    if search_rows not in SEARCH_ROWS:
        raise ValueError(f"search_rows: expected one of {SEARCH_ROWS}, got {search_rows!r}")
    if search_rows == "auto":
        return "last" if qconfig.name == "official" else "balanced"
    return search_rows


def _valid_text_rows(name, shape, lengths):
    """bool [B, R]: the rows of a text site's tensor at positions up to each prompt's
    end-of-text token (`lengths` [B]); None where the tensor has no position axis.

    Positions are axis 1 ([B, L, W], [B, L, H, D]) except in the attention logits and
    probabilities [B, H, L, L], whose rows are queries (axis 2)."""
    if lengths is None or len(shape) < 3:
        return None
    axis = 2 if name.endswith(("/logits", "/probs")) else 1
    row = jnp.arange(math.prod(shape[1:-1]))
    position = (row // math.prod(shape[axis + 1:-1])) % shape[axis]
    return position[None, :] < lengths[:, None]


def _pass_fn(model, method, specs, *, finalize=False, max_elements=None, num_samples=None):
    """jit: one calibration pass over a batch, (params, x, running stats, seeds, lengths,
    draws) -> ({site: batch stats}, {site: all finite}, features).

    With `num_samples` (the "balanced" search over a calibration set of that many samples)
    every pass returns, per searched site, (stats, (`observers.sample_rows` of this batch
    with the samples' `seeds`, which samples contribute)): about `max_elements` elements over
    the whole set, an equal quota per contributing sample, drawn among the rows
    `_valid_text_rows` allows (`lengths` [B]: text positions up to end-of-text; None: all
    rows). Where the budget has fewer rows than the set has samples, the samples with the
    smallest of `draws` (this batch's [B], and all of them sorted: "all") contribute.
    Otherwise the final pass (`finalize`) returns, per site, the running statistics with
    this batch's merged in and the rows of this batch that the observer searches on
    (`observers.search_input`).
    """

    def run(params, x, running, seeds, lengths, draws):
        results, finite = {}, {}

        def record(kind, name, a):
            del kind
            if name in specs:
                spec = specs[name]
                stats = observers.batch_stats(spec, a)
                if num_samples and observers.searches(spec):
                    samples, quota = observers.sample_quota(
                        num_samples, a.shape[-1], math.prod(a.shape[1:-1]), max_elements)
                    kept = draws["batch"] <= draws["all"][samples - 1]
                    stats = (stats, (*observers.sample_rows(
                        a, seeds, quota, valid=_valid_text_rows(name, a.shape, lengths)),
                        kept))
                elif finalize:
                    stats = (observers.merge(spec, running.get(name), stats),
                             observers.search_input(spec, a, max_elements))
                results[name] = stats
                finite[name] = jnp.all(jnp.isfinite(a))
            return a

        with sites.intercept(record):
            out = model.apply({"params": params}, x, method=method)
        return results, finite, out

    return jax.jit(run)


# A site's search scores every candidate range on up to `observers.SEARCH_MAX_ELEMENTS`
# elements: a small program whose run time, not its compile time, is what counts. So it is
# compiled at XLA's default optimization level (3) even in a process that lowers the level
# for everything else to compile faster (the test suite: tests/conftest.py), where XLA:CPU
# runs a 2^18-element OMSE search about 5x slower (docs/results.md).
SEARCH_COMPILER_OPTIONS = {"xla_backend_optimization_level": 3}


@functools.partial(jax.jit, static_argnums=0, compiler_options=SEARCH_COMPILER_OPTIONS)
def _site_qparams(spec, stats, searched):
    return state_lib.QParams(*observers.qparams_from_search_input(spec, stats, searched))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=SEARCH_COMPILER_OPTIONS)
def _sampled_site_qparams(spec, num_rows, stats, rows, seeds, index, weights, kept):
    searched, row_weights = observers.sampled_search_input(rows, seeds, index, weights, kept,
                                                           num_rows, stats["lo"].ndim)
    return state_lib.QParams(*observers.qparams_from_search_input(spec, stats, searched,
                                                                  row_weights))


def _check_finite(finite, what):
    """Raises naming the sites (in forward order) whose tensors held NaN/Inf."""
    bad = [name for name, ok in finite.items() if not bool(ok)]
    if bad:
        raise FloatingPointError(
            f"NaN/Inf in the calibration statistics of {what} sites {bad} (the first is where "
            "they appear): check the calibration data and the FP model")


def _calibrate_tower(model, params, specs, method, batches, max_elements, *, search_rows,
                     all_seeds):
    """{site: QParams}, the FP outputs of every batch and the last (x, seeds, lengths).

    `batches`: an iterable of (x, seeds, lengths), read once: per batch its input, the
    int32 [B] seeds of its samples and (text) their valid lengths or None, for the
    "balanced" search (see `_pass_fn`); `all_seeds` [N]: the seeds of every sample."""
    if search_rows == "balanced":
        num_samples = len(all_seeds)
        observe = _pass_fn(model, method, specs, max_elements=max_elements,
                           num_samples=num_samples)
        all_draws = np.sort(_uniform(all_seeds))
        running, sampled, outputs, last = {}, {}, [], None
        for last in batches:
            x, batch_seeds, batch_lengths = last
            results, finite, out = observe(params, x, {}, batch_seeds, batch_lengths,
                                           {"batch": _uniform(batch_seeds), "all": all_draws})
            _check_finite(finite, "activation")
            for name, value in results.items():
                stats = value
                if observers.searches(specs[name]):
                    stats, rows = value
                    sampled.setdefault(name, []).append((batch_seeds, *rows))
                running[name] = observers.merge(specs[name], running.get(name), stats)
            outputs.append(out)
        qparams = {}
        for name, stats in running.items():
            if name in sampled:
                batch_seeds, rows, index, weights, kept = map(list, zip(*sampled[name]))
                samples, _ = observers.sample_quota(num_samples, rows[0].shape[-1], 1,
                                                    max_elements)
                qparams[name] = _sampled_site_qparams(
                    specs[name], samples * index[0].shape[1], stats, rows, batch_seeds, index,
                    weights, kept)
            else:
                qparams[name] = _site_qparams(specs[name], stats, None)
        return qparams, outputs, last
    observe = _pass_fn(model, method, specs)
    running, outputs, last = {}, [], None
    for batch in batches:  # every batch but the last folded into the running statistics
        if last is not None:
            stats, finite, out = observe(params, last[0], {}, None, None, None)
            _check_finite(finite, "activation")
            running = {k: observers.merge(specs[k], running.get(k), v) for k, v in stats.items()}
            outputs.append(out)
        last = batch
    finalize = _pass_fn(model, method, specs, finalize=True, max_elements=max_elements)
    final, finite, out = finalize(params, last[0], running, None, None, None)
    _check_finite(finite, "activation")
    qparams = {name: _site_qparams(specs[name], *final[name]) for name in final}
    return qparams, outputs + [out], last


def _with_positions(batches):
    """batches -> (batch, int32 [B] each sample's position in the calibration set, None)."""
    start = 0
    for batch in batches:
        yield batch, np.arange(start, start + batch.shape[0], dtype=np.int32), None
        start += batch.shape[0]


def _uniform(seeds):
    """float64 [N] in [0, 1): a fixed hash of each int32 seed (which samples contribute
    when the element budget has fewer rows than the calibration set has samples)."""
    x = np.asarray(seeds, np.uint64)
    for _ in range(2):
        x = ((x ^ (x >> np.uint64(16))) * np.uint64(0x45D9F3B)) % np.uint64(2**32)
    return (x ^ (x >> np.uint64(16))) / 2.0**32


def _token_seeds(tokens):
    """int32 [N]: a hash of each prompt's tokens (FNV-1a), so that a prompt draws the same
    rows wherever it sits in the calibration set."""
    h = np.full(tokens.shape[0], 2166136261, np.uint64)
    for column in np.asarray(tokens, np.int64).T:
        h = ((h ^ column.astype(np.uint64)) * 16777619) % 2**32
    return (h % 2**31).astype(np.int32)


def _weights(qconfig, params, max_elements):
    """Calibrates and fake-quantizes every configured kernel once -> (QParams, kernels,
    {site: `diagnostics.weight_sums`})."""
    all_kernels = sites.kernels(params)
    specs = {name: spec for name in all_kernels
             if (spec := qconfig.spec("weight", name)) is not None}
    _check_finite({name: jnp.all(jnp.isfinite(all_kernels[name])) for name in specs}, "weight")

    @jax.jit
    def run(kernels):
        qparams, quantized, sums = {}, {}, {}
        for name, w in kernels.items():
            spec = specs[name]
            scale, zero_point = observers.qparams(spec, observers.batch_stats(spec, w), w,
                                                  max_elements=max_elements)
            qparams[name] = state_lib.QParams(scale, zero_point)
            quantized[name] = primitives.fake_quant(w, scale, zero_point, spec.fmt)
            sums[name] = diagnostics.weight_sums(w, quantized[name])
        return qparams, quantized, sums

    return run({name: all_kernels[name] for name in specs})


def _batch_list(batches, name):
    """`batches` as a list of arrays: one array is one batch, anything else a sequence of them.

    Refuses what is neither, e.g. a batch dict from `data.as_numpy_batches` (whose keys would be
    taken for batches), naming the argument `name`.
    """
    if batches is None:
        return []
    if hasattr(batches, "ndim"):
        batches = [batches]
    elif isinstance(batches, (str, bytes, abc.Mapping)):
        raise TypeError(f"{name}: expected an array [B, ...] or a sequence of them, got "
                        f"{type(batches).__name__} {_short(batches)}")
    listed = []
    for i, batch in enumerate(batches):
        if isinstance(batch, (str, bytes, abc.Mapping)):
            raise TypeError(f"{name}[{i}]: expected an array [B, ...], got "
                            f"{type(batch).__name__} {_short(batch)}")
        listed.append(jnp.asarray(batch))
    return listed


def _short(value):
    """A dict as its keys, anything else as a short repr, for an error message."""
    if isinstance(value, abc.Mapping):
        return f"with keys {list(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _image_batches(images, size, num_images):
    """`images` -> (the batches, each checked to be float [B >= 1, size, size, 3], the number
    of images). One array or a sequence is listed and checked up front; any other iterable
    (a generator) is read lazily, one batch at a time, and must yield `num_images` images."""
    expected = f"float [B, {size}, {size}, 3] (CLIP-normalized, e.g. from clip.preprocess)"
    if hasattr(images, "ndim") and images.ndim != 4:
        raise ValueError(f"images: expected one batch {expected} or a sequence of them, got an "
                         f"array of shape {images.shape}")

    def checked(i, batch):
        if (batch.ndim != 4 or batch.shape[1:] != (size, size, 3) or not batch.shape[0]
                or not jnp.issubdtype(batch.dtype, jnp.floating)):
            raise ValueError(f"images[{i}]: expected {expected}, got {batch.dtype} "
                             f"{batch.shape}")
        return batch

    if images is None or hasattr(images, "ndim") or isinstance(
            images, (abc.Sequence, abc.Mapping)):
        batches = [checked(i, b) for i, b in enumerate(_batch_list(images, "images"))]
        total = sum(b.shape[0] for b in batches)
        if num_images is not None and num_images != total:
            raise ValueError(f"images: {total} images given, but num_images={num_images}")
        return batches, total
    if num_images is None:
        raise TypeError(f"images: a {type(images).__name__} is read once, batch by batch; "
                        "give num_images=, the number of images it yields (or a list)")

    def stream():
        seen = 0
        for i, batch in enumerate(images):
            if isinstance(batch, (str, bytes, abc.Mapping)) or not hasattr(batch, "dtype"):
                raise TypeError(f"images[{i}]: expected an array [B, ...], got "
                                f"{type(batch).__name__} {_short(batch)}")
            seen += checked(i, batch).shape[0]
            if seen > num_images:
                raise ValueError(f"images: yielded more than num_images={num_images} images")
            yield batch
        if seen != num_images:
            raise ValueError(f"images: yielded {seen} images, but num_images={num_images}")

    return stream(), num_images


def calibrate(model, params, qconfig, *, images=None, texts=None, text_batch_size=256,
              return_text_features=False, search_rows="auto",
              search_max_elements=observers.SEARCH_MAX_ELEMENTS, num_images=None,
              return_report=False):
    """Post-training calibration of a CLIP for `qconfig`.

    Ends with the PTQ diagnostics (`quant.diagnostics`) on the final calibration batch of
    each quantized tower: every site's SQNR and the cosine of the quantized features to
    FP, logged (a WARNING naming the worst sites when a tower's features collapse).

    Args:
      model: a `clip.CLIP`.
      params: its FP params.
      qconfig: a `quant.QConfig` (or a preset name such as "w4a4attn8").
      images: CLIP-normalized image batches float32 [B, H, W, 3], a sequence of them or
        one array (one batch), or an iterable read once, batch by batch (e.g. a generator
        over a data pipeline: only one batch is held at a time), with `num_images`;
        needed when the image tower is quantized.
      texts: a sequence of prompt strings, e.g. the dataset's zero-shot ensemble (needed
        when the text tower is quantized); not one string.
      text_batch_size: prompts per calibration chunk.
      return_text_features: also return the FP text features of `texts` [N, E], which the
        calibration pass computes anyway (the P4Q teacher needs them).
      search_rows: where OMSE/PTF draw the rows they score their candidates on:
        "balanced", an equal quota from every image and every prompt (a prompt's rows up to
        its end-of-text token, drawn by a hash of its tokens; an image's by its place in
        `images`), so the scales depend on neither `text_batch_size`, the order of `texts`
        nor how `images` is cut into batches; "last", the final
        batch only, as FQ-ViT and the public P4Q code (whose final text chunk holds one
        class's prompts); "auto" (default): "last" for the `official` preset, else
        "balanced".
      search_max_elements: about how many elements OMSE/PTF score (whole rows drawn with a
        fixed seed); None scores all of them.
      num_images: how many images `images` holds: needed for a generator (the balanced
        search sizes each sample's share before the first batch), checked otherwise.
      return_report: also return the diagnostics' `quant.diagnostics.Report`.

    Returns:
      A QState, followed by the FP text features with `return_text_features` and the
      Report with `return_report`, as a tuple when either is asked for.
    """
    if isinstance(qconfig, str):
        qconfig = qconfig_lib.QConfig.parse(qconfig)
    search_rows = resolve_search_rows(search_rows, qconfig)
    if qconfig.name == "official" and model.config.vision.is_resnet and "visual" in qconfig.towers:
        raise ValueError(qconfig_lib.OFFICIAL_RESNET_ERROR)
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts: expected a list of prompt strings, got one {type(texts).__name__} "
                        f"{_short(texts)} (it would be read as one prompt per character); pass "
                        "[texts] for a single prompt")
    size = model.config.vision.image_size
    images, num_images = _image_batches(images, size, num_images)
    texts = None if texts is None else list(texts)
    weight_qparams, kernels, weight_sums = _weights(qconfig, params, search_max_elements)
    acts, text_features = {}, None
    image_example = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    image_specs = _site_specs(qconfig, model, params, model.encode_image, image_example,
                              "visual/")
    if image_specs:
        if not num_images:
            raise ValueError(f"images: config {qconfig.name!r} quantizes the image tower, so "
                             "calibration needs at least one image batch")
        image_qparams, image_features, last_images = _calibrate_tower(
            model, params, image_specs, model.encode_image, _with_positions(images),
            search_max_elements, search_rows=search_rows,
            all_seeds=np.arange(num_images, dtype=np.int32))
        acts |= image_qparams
    tokens = None if not texts else clip.crop_to_eot(clip.tokenize(list(texts)))
    text_example = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    text_specs = _site_specs(qconfig, model, params, model.encode_text, text_example, "text/")
    if text_specs or return_text_features:
        if tokens is None:
            raise ValueError(f"texts: config {qconfig.name!r} quantizes the text tower (or text "
                             "features were asked for), so calibration needs prompts")
        seeds = _token_seeds(tokens)
        lengths = np.asarray(model_lib.eot_index(tokens), np.int32) + 1
        chunks = [(tokens[i:i + text_batch_size], seeds[i:i + text_batch_size],
                   lengths[i:i + text_batch_size])
                  for i in range(0, len(tokens), text_batch_size)]
        text_qparams, outs, _ = _calibrate_tower(
            model, params, text_specs, model.encode_text, chunks, search_max_elements,
            search_rows=search_rows, all_seeds=seeds)
        acts |= text_qparams
        text_features = jnp.concatenate(outs)
    qstate = state_lib.QState(config=qconfig, acts=acts, weights=weight_qparams, kernels=kernels)
    site_sqnrs, cosines = diagnostics.weight_sqnr(qconfig, weight_sums), {}
    if image_specs:
        found, cosines["image"] = diagnostics.activation_sqnr(
            model, params, qstate, model.encode_image, last_images[0], image_features[-1],
            valid_rows=_valid_text_rows)
        site_sqnrs += found
    if text_specs:
        found, cosines["text"] = diagnostics.activation_sqnr(
            model, params, qstate, model.encode_text, chunks[-1][0], outs[-1], chunks[-1][2],
            valid_rows=_valid_text_rows)
        site_sqnrs += found
    report = diagnostics.report(site_sqnrs, cosines)
    report.log()
    out = (qstate,) + (text_features,) * return_text_features + (report,) * return_report
    return out if len(out) > 1 else qstate


def calibrate_module(module, params, qconfig, batches, *, search_rows="balanced",
                     search_max_elements=observers.SEARCH_MAX_ELEMENTS):
    """Calibrates any Flax module's sites (e.g. P4Q's adapter) on input batches -> QState.

    `batches`: a sequence of arrays [B, ...] of one shape past the batch axis, or one array.
    `search_rows`: "balanced" (every sample) or "last" (the final batch), see `calibrate`.
    """
    if search_rows not in ("balanced", "last"):
        raise ValueError(f"search_rows: expected 'balanced' or 'last', got {search_rows!r}")
    batches = _batch_list(batches, "batches")
    if not batches:
        raise ValueError("batches: calibration needs at least one batch")
    for i, batch in enumerate(batches):
        if batch.ndim < 1 or not batch.shape[0] or batch.shape[1:] != batches[0].shape[1:]:
            raise ValueError(f"batches[{i}]: expected a non-empty batch [B, "
                             f"{', '.join(map(str, batches[0].shape[1:]))}], got {batch.shape}")
    weight_qparams, kernels, _ = _weights(qconfig, params, search_max_elements)
    example = jax.ShapeDtypeStruct((1, *batches[0].shape[1:]), batches[0].dtype)
    specs = _site_specs(qconfig, module, params, module.__call__, example)
    acts, _, _ = _calibrate_tower(module, params, specs, module.__call__, _with_positions(batches),
                               search_max_elements, search_rows=search_rows,
                               all_seeds=np.arange(sum(b.shape[0] for b in batches),
                                                   dtype=np.int32))
    return state_lib.QState(config=qconfig, acts=acts, weights=weight_qparams, kernels=kernels)
