"""The cost columns of a results row: what a method trains, the wall time of its calibration
and training, the process's peak memory and the bytes on disk of what it keeps.

Every row of the zero-shot, ptq and p4q jobs (and so of the demo) carries `FIELDS`:

* trainable_params: parameters trained by gradient: the learned context (when
  `p4q.train_prompts`) plus the QAdapter's weights; 0 for FP zero-shot, PTQ and QwT.
* compensation_params: QwT's closed-form block compensation (`quant.compensation`), solved
  once, not trained by gradient; 0 without one.
* calibration_seconds: the towers' calibration (PTQ), plus QwT's solve where the row has
  one; a calibration that runs of one process share (the demo) is measured once and every
  row that uses it carries its seconds.
* training_seconds: the feature cache (built, or read back), the training steps and the
  adapter's calibration; 0 for rows that do not train.
* wall_seconds: their sum.
* peak_rss_gb: the process's peak resident memory when the row's work ended
  (`phases.peak_rss_bytes`): in one process that runs several jobs (the demo), a running
  maximum over everything before it.
* bytes: bytes on disk of what the row deploys: the FP checkpoint (FP zero-shot), the
  exported towers (PTQ; QwT with its compensation), the whole export (trained rows: towers,
  prompts and adapter); None where nothing was written (the ptq job exports nothing).
"""

import jax
import numpy as np

from p4q_jax import phases

FIELDS = ("trainable_params", "compensation_params", "calibration_seconds", "training_seconds",
          "wall_seconds", "peak_rss_gb", "bytes")


def parameter_count(tree):
    """The number of values in a pytree of arrays (0 for None or an empty tree)."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def trainable_count(trained, *, train_prompts):
    """Parameters a trained row learned by gradient: its context (if trained) + adapter."""
    context = int(np.size(trained.context)) if train_prompts else 0
    return context + parameter_count(trained.adapter_params)


def compensation_count(qstate):
    """QwT's solved parameters in `qstate` (0 for None or no compensation)."""
    return 0 if qstate is None else parameter_count(qstate.compensation)


def fields(*, trainable=0, compensation=0, calibration_seconds=0.0, training_seconds=0.0,
           bytes_on_disk=None):
    """The cost columns of a row whose work has just ended (`FIELDS`)."""
    return {"trainable_params": int(trainable), "compensation_params": int(compensation),
            "calibration_seconds": round(float(calibration_seconds), 2),
            "training_seconds": round(float(training_seconds), 2),
            "wall_seconds": round(float(calibration_seconds) + float(training_seconds), 2),
            "peak_rss_gb": round(phases.peak_rss_bytes() / phases.GB, 3),
            "bytes": bytes_on_disk}
