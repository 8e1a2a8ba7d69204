"""Result files: written by process 0 only, to a temporary name and then renamed."""

import json
import os
import pathlib
import tempfile

import jax


def write_json(path, obj):
    """Atomically writes `obj` as JSON (process 0 only; others return immediately)."""
    if jax.process_index() != 0:
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot_curves(path, history, *, title=""):
    """Training curves (loss terms; learning rates) as a PNG, atomically (process 0 only)."""
    if jax.process_index() != 0 or not history:
        return
    import matplotlib  # pylint: disable=g-import-not-at-top; plotting only here
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    steps = [h["step"] for h in history]
    fig, (losses, rates) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted(history[0]):
        if name == "step":
            continue
        axis = rates if name.startswith("lr_") else losses
        axis.plot(steps, [h[name] for h in history], label=name)
    for axis, label in ((losses, "loss / accuracy"), (rates, "learning rate")):
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.legend()
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
