"""Training checkpoints: an Orbax `CheckpointManager` that survives preemption.

Every `every_steps` steps the train state (trainable params, optimizer state, step) is
saved asynchronously next to a small JSON record (the input position, the data seed, the
metric history), keeping the last `keep`. Orbax writes each step to a temporary name and
renames it when complete, so a run killed mid-save leaves no half checkpoint behind. A
checkpoint that is complete but unreadable (a truncated or corrupted file) is detected on
restore: it is deleted with a warning and the previous one is used.
"""

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """Periodic async saves and resume-from-latest of (train state, JSON metadata)."""

    def __init__(self, directory, *, every_steps, keep=3, async_save=True):
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps={every_steps} must be >= 1")
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "meta"))

    def save(self, step, state, meta, *, force=False):
        """Starts saving (in the background) when `step` is a multiple of `every_steps`, or
        with `force` -> whether a save started."""
        if not force and step % self.every_steps:
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, template):
        """(state, meta) of the newest readable checkpoint, placed like `template`; or
        (None, None) when there is none. Unreadable newer ones are deleted with a warning."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # pylint: disable=broad-except; any read failure means unusable
                logging.warning("checkpoint at step %d in %s is unreadable (%s: %.200s); "
                                "deleting it and trying the previous one", step,
                                self.manager.directory, type(e).__name__, e)
                self.manager.delete(step)
                continue
            logging.info("resuming from the checkpoint at step %d", step)
            return restored.state, restored.meta
        return None, None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
