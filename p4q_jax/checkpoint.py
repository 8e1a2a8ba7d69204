"""Training checkpoints: an Orbax `CheckpointManager` that survives preemption and reruns.

Every `every_steps` steps the train state (trainable params, optimizer state, step) is
saved asynchronously next to a small JSON record (the input position, the metric history,
and the run's *fingerprint*), keeping the last `keep`. Orbax writes each step to a
temporary name and renames it when complete, so a run killed mid-save leaves no half
checkpoint behind.

A rerun in the same directory resumes only the same run: the fingerprint is every config
field that shapes the train state or the training (`run_fingerprint`), and a checkpoint with
another one stops the rerun before any work (`RunMismatchError`, listing the fields). The
other modes' result files carry their mode's fingerprint for the same check.
Nothing is ever deleted on a guess: a checkpoint that fails to read although its
fingerprint matches (a truncated or corrupted file) is moved to `unreadable/` with the
reason, and the previous one is used; `move_run_aside` keeps a whole old run when the user
asks to start afresh.
"""

import datetime
import json
import pathlib

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

UNREADABLE = "unreadable"
# Per mode, the sections of the config that shape its results (for `p4q`, the train state
# and the training) and single fields outside them; then the fields in them that do not:
# where files live, names of outputs, logging cadence. `eval` measures the export it names.
_FINGERPRINT_SECTIONS = {
    "p4q": (("model", "quant", "p4q", "train", "loss", "data"), ("seed",)),
    "qat": (("model", "quant", "p4q", "train", "loss", "data", "qat"), ("seed",)),
    "ptq": (("model", "quant", "data"), ("seed",)),
    "zeroshot": (("model", "data"), ("seed", "quant.fold_batchnorm")),
    "eval": (("data",), ("p4q.export_dir",)),
}
_NOT_FINGERPRINTED = {"data.data_dir", "data.manual_dir", "data.root", "p4q.export_dir",
                      "p4q.method", "train.log_every"}
# What a `p4q` run writes in its workdir, moved aside together by `move_run_aside`.
RUN_OUTPUTS = ("checkpoints", "export", "results.json", "training_curves.png",
               "train_split.json", "events.out.tfevents.*")


class RunMismatchError(ValueError):
    """A workdir holds checkpoints of a run with another config."""


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_fingerprint(config, mode="p4q"):
    """{dotted field: value} of everything that shapes `mode`'s results. For `p4q` (and
    `qat`), the train state and the training: the seed, the model, quantization,
    prompts/adapter, optimizer, loss and data fields (a QAT run's: also its `qat` section
    and the mode, so a p4q and a qat run never resume each other's checkpoints), and
    whether the input comes from the feature cache (it orders examples differently) and
    how many random views it holds; `ptq` and `zeroshot` the
    seed (a random init's, the calibration draw's), model, data (and quantization); `eval`
    the data and the export it measures."""
    sections, single = _FINGERPRINT_SECTIONS[mode]
    fields = {}
    if mode == "p4q":
        fields.update({"speed.feature_cache": config.speed.feature_cache,
                       "speed.feature_cache_views": config.speed.feature_cache_views})
    if mode == "p4q" and config.mode == "qat":  # the train loop's fingerprint of a QAT run
        sections, fields["mode"] = _FINGERPRINT_SECTIONS["qat"][0], "qat"
    for section in sections:
        fields.update(_flatten(config[section].to_dict(), f"{section}."))
    fields = {k: v for k, v in fields.items() if k not in _NOT_FINGERPRINTED}
    for dotted in single:
        *section, name = dotted.split(".")
        fields[dotted] = (config[section[0]] if section else config)[name]
    return json.loads(json.dumps(fields, sort_keys=True))  # tuples -> lists, as stored


def differences(stored, current):
    """Lines "field: stored -> current" for every field whose value differs."""
    return [f"{k}: {stored.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]


def mismatch(what, stored, current, *, afresh):
    """The RunMismatchError of `what` (e.g. "DIR holds the checkpoint (step 3)") written
    by a run with the `stored` fingerprint (None: none recorded), listing the fields that
    differ from `current`, and `afresh`: how to start a new run instead."""
    lines = differences(stored, current) if stored is not None else [
        "no fingerprint of its config is recorded (written by an older version)"]
    return RunMismatchError(f"{what} of a run with another config:\n  " + "\n  ".join(lines)
                            + f"\nNothing was changed. {afresh}")


def _mismatch(directory, step, stored, current):
    workdir = pathlib.Path(directory).parent
    return mismatch(
        f"{directory} holds the checkpoint (step {step})", stored, current,
        afresh=f"To start a new run, use another --workdir, or pass "
        f"--config.checkpoint.restart=True to move the old run in {workdir} aside (to "
        f"{workdir}/previous/) and start afresh.")


def _sync(name):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Periodic async saves and resume-from-latest of (train state, JSON metadata)."""

    def __init__(self, directory, *, every_steps, keep=3, async_save=True, fingerprint=None):
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps={every_steps} must be >= 1")
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.every_steps = every_steps
        self.fingerprint = fingerprint
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "meta"))

    def save(self, step, state, meta, *, force=False):
        """Starts saving (in the background) when `step` is a multiple of `every_steps`, or
        with `force` -> whether a save started. The fingerprint is added to `meta`."""
        if not force and step % self.every_steps:
            return False
        if self.fingerprint is not None:
            meta = {**meta, "fingerprint": self.fingerprint}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def _read_meta(self, step):
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def check_resumable(self):
        """Raises RunMismatchError if the newest checkpoint with readable metadata is of a
        run with another fingerprint. Reads only the small JSON records."""
        if self.fingerprint is None:
            return
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self._read_meta(step)
            except Exception:  # pylint: disable=broad-except; restore_latest deals with it
                continue
            if meta.get("fingerprint") != self.fingerprint:
                raise _mismatch(self.directory, step, meta.get("fingerprint"), self.fingerprint)
            return

    def restore_latest(self, template):
        """(state, meta) of the newest readable checkpoint, placed like `template`; or
        (None, None) when there is none.

        Raises RunMismatchError for a checkpoint of another run (nothing is touched). A
        newer checkpoint that cannot be read is moved to `unreadable/` with the reason."""
        self.check_resumable()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # pylint: disable=broad-except; any read failure means unusable
                self._set_aside(step, f"{type(e).__name__}: {e}")
                continue
            logging.info("resuming from the checkpoint at step %d", step)
            return restored.state, restored.meta
        return None, None

    def _set_aside(self, step, reason):
        """Moves an unreadable step to `unreadable/<step>[-n]/` with a REASON.txt."""
        target = self.directory / UNREADABLE / str(step)
        n = 0
        while target.exists():
            n += 1
            target = self.directory / UNREADABLE / f"{step}-{n}"
        logging.warning("checkpoint at step %d in %s is unreadable (%.300s); moved to %s, "
                        "trying the previous one", step, self.directory, reason, target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
            (target / "REASON.txt").write_text(reason + "\n")
        _sync(f"p4q_jax_checkpoint_set_aside_{step}")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def move_run_aside(workdir, outputs=RUN_OUTPUTS):
    """Moves a run's `outputs` (glob patterns; by default a `p4q` run's) to
    WORKDIR/previous/<UTC time>/ -> that folder, or None when there was nothing to move.
    Process 0 moves; the others wait for it."""
    workdir = pathlib.Path(workdir).absolute()
    found = [p for pattern in outputs for p in sorted(workdir.glob(pattern))]
    if not found:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = workdir / "previous" / stamp
    if jax.process_index() == 0:
        n = 0
        while target.exists():
            n += 1
            target = workdir / "previous" / f"{stamp}-{n}"
        target.mkdir(parents=True)
        for path in found:
            path.rename(target / path.name)
        logging.warning("moved the previous run in %s to %s", workdir, target)
    _sync("p4q_jax_move_run_aside")
    return target
