"""Observers: pure functions from activation/weight statistics to scales and zero points.

Calibration folds `batch_stats` over batches with `merge`, then `qparams` turns the
statistics (and, for the search-based observers, the final batch's tensor) into
`(scale, zero_point)`. The range-to-parameters formulas are FQ-ViT's (which the public
P4Q code uses): scales are clamped to float32 eps and the asymmetric zero point is
clamped to the integer grid. Unlike FQ-ViT, an asymmetric range is first widened to hold
0 (`QuantSpec.include_zero`, the default; the `official` preset keeps FQ-ViT's way): the
zero point is a code, so the grid always holds 0, and a range that does not (softmax
probabilities are all > 0) would otherwise be cut to [0, hi - lo] by the clamped zero
point. A near-uniform attention over 50 tokens, probabilities in [0.0198, 0.0202], then
quantizes every probability to 0.0004: the attention output shrinks 50-fold.

* minmax: running min/max.
* ema: exponential moving average of per-batch min/max (momentum `EMA_MOMENTUM`).
* percentile: EMA of per-batch 1e-4 / 1 - 1e-4 quantiles (robust to outliers).
* omse: running min/max, then the clipping ratio r in {1.00, 0.99, ..., 0.11} applied to
  both ends that minimises the mean squared quantization error on a set of rows (tokens
  or pixels). FQ-ViT and the public P4Q code score every element of the *final* batch;
  calibration (`quant.calibrate`) instead draws the rows from every batch, an equal quota
  per sample (`sample_rows`), unless told to keep the public behaviour. Either way the
  score uses at most about `SEARCH_MAX_ELEMENTS` elements (whole rows, drawn with a fixed
  seed), which makes ViT-B/32's image calibration several times faster; `None` scores all.
* ptf: FQ-ViT's power-of-two factors for LayerNorm inputs: one zero point, and per
  channel the scale `s / 2^k` (k in 0..3, s the 8x-coarsest scale) with least error.
* log2: no parameters (the log2 quantizer for softmax probabilities).
"""

import jax
import jax.numpy as jnp

from p4q_jax.quant import primitives

EPS = float(jnp.finfo(jnp.float32).eps)
EMA_MOMENTUM = 0.9
PERCENTILE = 1e-4
OMSE_RATIOS = 90
PTF_FACTORS = 4
SEARCH_MAX_ELEMENTS = 2**18
_SEARCH_SEED = 0


def _axes(x, per_channel):
    return tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))


def batch_stats(spec, x):
    """Statistics of one batch: {"lo", "hi"} broadcastable against `x`."""
    x = x.astype(jnp.float32)
    axes = _axes(x, spec.per_channel)
    if spec.observer == "percentile":
        lo = jnp.quantile(x, PERCENTILE, axis=axes, keepdims=True)
        hi = jnp.quantile(x, 1 - PERCENTILE, axis=axes, keepdims=True)
    else:
        lo, hi = jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)
    return {"lo": lo, "hi": hi}


def merge(spec, running, new):
    """Folds one batch's statistics into the running ones."""
    if running is None:
        return new
    if spec.observer in ("ema", "percentile"):
        m = EMA_MOMENTUM
        return jax.tree.map(lambda r, n: m * r + (1 - m) * n, running, new)
    return {"lo": jnp.minimum(running["lo"], new["lo"]),
            "hi": jnp.maximum(running["hi"], new["hi"])}


def range_qparams(lo, hi, spec, *, symmetric=None):
    """FQ-ViT's scale / zero point for the range [lo, hi] on `spec`'s integer grid."""
    fmt = spec.fmt
    symmetric = spec.symmetric if symmetric is None else symmetric
    if spec.include_zero:
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    if symmetric:
        scale = jnp.maximum(jnp.maximum(-lo, hi) / ((fmt.qmax - fmt.qmin) / 2), EPS)
        return scale, jnp.zeros_like(scale)
    scale = jnp.maximum((hi - lo) / (fmt.qmax - fmt.qmin), EPS)
    zero_point = jnp.clip(fmt.qmin - jnp.round(lo / scale), fmt.qmin, fmt.qmax)
    return scale, zero_point


def _mse(x, scale, zero_point, fmt, axes=None, weights=None):
    """Mean squared quantization error over `axes`; rows weighted by `weights` [..., n, 1]."""
    q = primitives.quantize(x, scale, zero_point, fmt)
    error = jnp.square(x - primitives.dequantize(q, scale, zero_point))
    if weights is None:
        return jnp.mean(error, axis=axes)
    weights = jnp.broadcast_to(weights, error.shape)
    return jnp.sum(error * weights, axis=axes) / jnp.sum(weights, axis=axes)


def _omse(spec, stats, x, weights=None):
    ratios = 1.0 - 0.01 * jnp.arange(OMSE_RATIOS, dtype=jnp.float32)

    def error(r):
        return _mse(x, *range_qparams(stats["lo"] * r, stats["hi"] * r, spec), spec.fmt,
                    weights=weights)

    # Candidates in vectorised chunks: fast, with bounded memory on large activations.
    errors = jax.lax.map(error, ratios, batch_size=10)
    best = ratios[jnp.argmin(errors)]  # argmin: ties go to the widest range, as FQ-ViT
    return range_qparams(stats["lo"] * best, stats["hi"] * best, spec)


def _ptf(spec, stats, x, weights=None):
    lo, hi = jnp.min(stats["lo"]), jnp.max(stats["hi"])
    coarse, zero_point = range_qparams(lo, hi, spec, symmetric=False)
    axes = tuple(range(x.ndim - 1))
    factors = 2.0 ** -jnp.arange(PTF_FACTORS, dtype=jnp.float32)  # s, s/2, s/4, s/8
    errors = jnp.stack([_mse(x, coarse * f, zero_point, spec.fmt, axes, weights)
                        for f in factors])
    scale = (coarse * factors[jnp.argmin(errors, axis=0)]).reshape((1,) * len(axes) + (-1,))
    return scale, jnp.broadcast_to(zero_point, scale.shape)


def searches(spec):
    """Whether `spec`'s observer searches over rows of the data (omse, ptf)."""
    return spec.observer in ("omse", "ptf")


def search_rows(x, max_elements):
    """At most `max_elements` of `x` as whole rows [n, C] (last axis kept), fixed seed."""
    rows = x.reshape(-1, x.shape[-1])
    n = max_elements // x.shape[-1] if max_elements else rows.shape[0]
    if n >= rows.shape[0]:
        return rows
    idx = jax.random.choice(jax.random.key(_SEARCH_SEED), rows.shape[0], (max(n, 1),),
                            replace=False)
    return rows[jnp.sort(idx)]


def sample_quota(num_samples, channels, rows_per_sample, max_elements):
    """(samples that contribute, rows each) so that about `max_elements` elements of a site
    with `channels` per row are searched (None: every row of every sample)."""
    if not max_elements:
        return num_samples, rows_per_sample
    budget = max(1, max_elements // channels)
    return min(num_samples, budget), min(rows_per_sample, max(1, budget // num_samples))


def sample_rows(x, seeds, quota, *, valid=None):
    """An equal share of every sample's rows, for a search over a whole calibration set.

    Args:
      x: one batch's tensor [B, ..., C]; its rows are the vectors along C.
      seeds: int32 [B], one per sample: the draw depends on the sample's seed alone, not on
        the batch it arrived in or its place there.
      quota: rows per sample (at most the sample's row count).
      valid: optional bool [B, R] (R rows per sample): rows that may be drawn, e.g. the
        text positions up to each prompt's end-of-text token.

    Returns:
      (rows float32 [B, k, C], row indices int32 [B, k], weights float32 [B, k]: 1 for a
      drawn valid row, 0 for padding that fills a short sample's quota).
    """
    b, c = x.shape[0], x.shape[-1]
    rows = x.reshape(b, -1, c).astype(jnp.float32)
    r = rows.shape[1]
    base = jax.random.key(_SEARCH_SEED)
    scores = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(base, s), (r,)))(seeds)
    if valid is not None:
        scores = jnp.where(valid, scores, 2.0)  # after every valid row
    neg_scores, index = jax.lax.top_k(-scores, min(quota, r))
    picked = jnp.take_along_axis(rows, index[..., None], axis=1)
    return picked, index.astype(jnp.int32), (neg_scores >= -1.0).astype(jnp.float32)


def sampled_search_input(rows, seeds, index, weights, kept, num_rows, ndim):
    """`sample_rows`' outputs of every batch -> (search rows, row weights) for `qparams`.

    `kept` (bool [B] per batch) marks the samples that contribute; `num_rows` (static) is
    their row count. Rows are ordered by (sample seed, row index), so the result depends on
    neither the batching nor the order of the calibration samples. `ndim`: the site
    tensor's rank.
    """
    def flat(parts):
        return jnp.concatenate([p.reshape(-1, *p.shape[2:]) for p in parts])

    per_row = lambda per_sample: [jnp.broadcast_to(s[:, None], i.shape)
                                  for s, i in zip(per_sample, index)]
    order = jnp.lexsort((flat(index), flat(per_row(seeds)), ~flat(per_row(kept))))[:num_rows]
    lead = (1,) * (ndim - 2)
    return flat(rows)[order].reshape(lead + (num_rows, -1)), flat(weights)[order].reshape(
        lead + (num_rows, 1))


def search_input(spec, x, max_elements=SEARCH_MAX_ELEMENTS):
    """The part of a final-batch tensor that `qparams` needs: for omse / ptf at most
    `max_elements` of `x` as whole rows (see `search_rows`; rank kept; None: all of them),
    float32; None for the other observers, which use the statistics alone."""
    if not searches(spec):
        return None
    x = x.astype(jnp.float32)
    if x.ndim < 2:
        return x
    rows = search_rows(x, max_elements)  # same rank as the statistics
    return rows.reshape((1,) * (x.ndim - 2) + rows.shape)


def qparams_from_search_input(spec, stats, searched, weights=None):
    """(scale, zero_point) from the statistics and the searched rows (`search_input`'s
    output, or `sampled_search_input`'s rows and their weights)."""
    if spec.observer == "omse":
        return _omse(spec, stats, searched, weights)
    if spec.observer == "ptf":
        if not spec.per_channel:
            raise ValueError("the ptf observer needs per_channel=True")
        return _ptf(spec, stats, searched, weights)
    if spec.observer == "log2":
        return jnp.ones(()), jnp.zeros(())
    return range_qparams(stats["lo"], stats["hi"], spec)


def qparams(spec, stats, x_last, *, max_elements=SEARCH_MAX_ELEMENTS):
    """(scale, zero_point) for a site from its statistics and the final batch's tensor.

    The search-based observers (omse, ptf) score candidates on at most `max_elements`
    elements of `x_last` (see `search_rows`; None: all of them).
    """
    return qparams_from_search_input(spec, stats, search_input(spec, x_last, max_elements))
