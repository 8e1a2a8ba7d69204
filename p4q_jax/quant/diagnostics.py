"""PTQ diagnostics: how much of the signal each quantization site keeps.

`quant.calibrate` ends with one more look at the final calibration batch of each tower
it quantizes (the first `SAMPLES` images of the last image batch, or prompts of the last
chunk): the quantized model (fake-quant arithmetic) runs them once, which gives the
cosine of its features to the FP features calibration computed, and at every quantized
site the signal-to-quantization-noise ratio of the site's calibrated quantizer on the
tensor that reaches it,

    SQNR = 10 log10(E[x^2] / E[(x - q(x))^2])  (dB; text positions after each prompt's
    end-of-text token left out).

Kernels get theirs from the FP and fake-quantized kernels as calibration quantizes them.
The cost is one forward pass of `SAMPLES` samples per tower, and its compilation.

An 8-bit site that represents its tensor well sits near 40-50 dB; one far below its
neighbours (a few dB) is where the signal is lost. `Report.log` warns, naming the worst
sites, when a tower's mean cosine falls below `COSINE_WARNING`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from absl import logging

from p4q_jax.quant import sites

COSINE_WARNING = 0.9
SAMPLES = 8
WORST_SITES = 10


@dataclasses.dataclass(frozen=True)
class SiteSQNR:
    """One site: `tensor` "weight" (a kernel) or "activation"; `sqnr_db` None when the
    quantizer is exact on the data (no error to compare with)."""

    site: str
    tensor: str
    bits: int
    sqnr_db: float | None


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-site SQNR on the calibration data, worst first, and per tower ("image",
    "text") the mean and smallest cosine of the quantized features to FP."""

    sites: tuple[SiteSQNR, ...]
    cosines: dict

    def worst(self, n=WORST_SITES):
        """The `n` sites with the lowest SQNR."""
        return [s for s in self.sites if s.sqnr_db is not None][:n]

    def collapsed(self):
        """The towers whose mean cosine to FP is below `COSINE_WARNING`."""
        return [t for t, c in self.cosines.items() if c["mean"] < COSINE_WARNING]

    def to_dict(self, n=WORST_SITES):
        """The compact form for results.json: the cosines and the `n` worst sites."""
        return {"cosine_to_fp": self.cosines, "num_sites": len(self.sites),
                "worst_sites": [{"site": s.site, "tensor": s.tensor, "bits": s.bits,
                                 "sqnr_db": round(s.sqnr_db, 2)} for s in self.worst(n)]}

    def summary(self, n=5):
        cosines = ", ".join(f"{t} {c['mean']:.4f} (min {c['min']:.4f})"
                            for t, c in self.cosines.items())
        worst = ", ".join(f"{s.site} [{s.tensor}, {s.bits} bits] {s.sqnr_db:.1f} dB"
                          for s in self.worst(n))
        return f"cosine to FP on the calibration data: {cosines}; lowest SQNR: {worst}"

    def log(self):
        """Logs the summary; a WARNING when a tower's features collapse."""
        if self.collapsed():
            logging.warning(
                "PTQ: the quantized %s features lose most of the signal (mean cosine to FP "
                "below %.2f). Look at the sites with the lowest SQNR first; a site far below "
                "the others is where it is lost. %s", " and ".join(self.collapsed()),
                COSINE_WARNING, self.summary(WORST_SITES))
        else:
            logging.info("PTQ: %s", self.summary())


def _db(signal, noise):
    signal, noise = float(signal), float(noise)
    return None if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def weight_sums(w, quantized):
    """(sum w^2, sum (w - q(w))^2) of one kernel and its fake-quantized copy (traceable)."""
    w, quantized = w.astype(jnp.float32), quantized.astype(jnp.float32)
    return jnp.sum(jnp.square(w)), jnp.sum(jnp.square(w - quantized))


def weight_sqnr(qconfig, sums):
    """[SiteSQNR] of the kernels from their `weight_sums` {site: (signal, noise)}."""
    return [SiteSQNR(name, "weight", qconfig.spec("weight", name).bits, _db(*sums[name]))
            for name in sums]


def _tower_fn(model, method, valid_rows):
    """jit: (params, qstate, x, lengths, FP features of x) -> (on the first `SAMPLES` of x,
    {site: (sum x^2,
    sum (x - q(x))^2, bits)}, mean and smallest per-sample cosine of the quantized features
    to FP), from one quantized forward pass (fake-quant arithmetic)."""

    def run(params, qstate, x, lengths, fp):
        x, fp = x[:SAMPLES], fp[:SAMPLES]
        lengths = None if lengths is None else lengths[:SAMPLES]
        sums = {}

        def measure(kind, name, a):
            spec = qstate.config.spec(kind, name)
            if spec is None:
                return a
            quantized = qstate.handler(kind, name, a)
            a32 = a.astype(jnp.float32)
            signal = jnp.square(a32)
            noise = jnp.square(a32 - quantized.astype(jnp.float32))
            valid = valid_rows(name, a.shape, lengths)
            if valid is not None:
                weight = valid.reshape(*a.shape[:-1], 1).astype(jnp.float32)
                signal, noise = signal * weight, noise * weight
            old = sums.get(name, (0.0, 0.0, spec.bits))
            sums[name] = (old[0] + jnp.sum(signal), old[1] + jnp.sum(noise), spec.bits)
            return quantized

        with sites.intercept(measure):
            q = model.apply({"params": qstate.quantized_params(params)}, x, method=method)
        q, fp = q.astype(jnp.float32), fp.astype(jnp.float32)
        cosine = jnp.sum(fp * q, -1) / (jnp.linalg.norm(fp, axis=-1) * jnp.linalg.norm(q, axis=-1)
                                        + 1e-30)
        return sums, (jnp.mean(cosine), jnp.min(cosine))

    return jax.jit(run)


def activation_sqnr(model, params, qstate, method, x, fp, lengths=None, *, valid_rows):
    """([SiteSQNR] of the quantized activation sites that `method` passes on the first
    `SAMPLES` of the batch `x`, {"mean", "min"} cosine of their quantized features to `fp`,
    x's FP features).

    Each site's quantizer sees the tensor that reaches it in the quantized model.
    `lengths` (text): each prompt's valid length, turned into a row mask by
    `valid_rows(name, shape, lengths)` (None: every row counts)."""
    sums, (mean, smallest) = _tower_fn(model, method, valid_rows)(params, qstate, x, lengths,
                                                                   fp)
    found = [SiteSQNR(name, "activation", int(bits), _db(signal, noise))
             for name, (signal, noise, bits) in sums.items()]
    return found, {"mean": float(mean), "min": float(smallest)}


def report(site_sqnrs, cosines):
    """A Report with the sites sorted worst first (exact sites last)."""
    key = lambda s: math.inf if s.sqnr_db is None else s.sqnr_db  # noqa: E731
    return Report(sites=tuple(sorted(site_sqnrs, key=key)), cosines=cosines)
