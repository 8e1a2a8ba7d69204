"""Result files: written by process 0 only, atomically (`p4q_jax.atomic`)."""

import json
import pathlib

import jax

from p4q_jax import atomic


# The file each mode writes in its workdir: an evaluation of an export (often in the
# training workdir, where the export is by default) must not overwrite the training's.
_FILES = {"eval": "eval_results.json"}


def file_for(workdir, mode):
    """The results file of `mode` in `workdir`."""
    return pathlib.Path(workdir) / _FILES.get(mode, "results.json")


def write_json(path, obj):
    """Atomically writes `obj` as JSON (process 0 only; others return immediately)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def markdown_table(header, rows):
    """A GitHub markdown table: `header` is a list of column titles, `rows` lists of cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(path, text):
    """Atomically writes a text file (process 0 only)."""
    if jax.process_index() != 0:
        return
    atomic.write_text(path, text)


def metric_writer(workdir):
    """clu's default writer (TensorBoard + log) in `workdir`; other processes only log.

    Imported here: clu's writers import TensorFlow (5 s), which preflight must not wait for.
    """
    from clu import metric_writers  # pylint: disable=g-import-not-at-top

    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def _pyplot():
    import matplotlib  # pylint: disable=g-import-not-at-top; plotting only here
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt


def _save_figure(plt, fig, path):
    try:
        with atomic.file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def plot_curves(path, history, *, title=""):
    """Training curves (loss terms; learning rates) as a PNG, atomically (process 0 only)."""
    if jax.process_index() != 0 or not history:
        return
    plt = _pyplot()
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
    _save_figure(plt, fig, path)


def _bars(axis, groups, series, errors=None):
    """Grouped bars on `axis`: a group per label in `groups`, a bar per series in each."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        errs = (errors or {}).get(name) or [None] * len(values)
        kept = [(x, v, e or 0.0) for x, v, e in zip(xs, values, errs) if v is not None]
        bars = axis.bar([k[0] for k in kept], [k[1] for k in kept], width, label=name,
                        yerr=[k[2] for k in kept] if errors else None, capsize=3)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(range(len(groups)), groups)
    axis.grid(axis="y", alpha=0.3)


def plot_bars(path, groups, series, *, errors=None, ylabel="top-1 (%)", title=""):
    """Grouped bars as a PNG, atomically (process 0 only).

    Args:
        path: the PNG to write.
        groups: a label per group on the x axis (e.g. bit settings).
        series: {name: one value per group, None where it has none} (e.g. FP, PTQ, P4Q).
        errors: optional {name: one error-bar half-length per group (or None)}.
    """
    if jax.process_index() != 0:
        return
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(max(5, 1.6 * len(groups) * len(series) / 2 + 2), 4))
    _bars(axis, groups, series, errors)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    fig.tight_layout()
    _save_figure(plt, fig, path)


def _plot_panels(path, panels, draw, *, columns, size):
    """A grid of panels, `draw(axis, title, series)` each, legend on the first, as a PNG."""
    plt = _pyplot()
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows),
                             squeeze=False)
    for axis, (title, series) in zip(axes.flat, panels.items()):
        draw(axis, title, series)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def plot_bar_panels(path, panels, *, groups, ylabel="top-1 (%)"):
    """`plot_bars`'s grouped bars, one panel per {title: series}, in one PNG (process 0)."""
    if jax.process_index() != 0:
        return

    def draw(axis, title, series):
        _bars(axis, groups, series)
        axis.set_title(title)
        axis.set_ylabel(ylabel)

    _plot_panels(path, panels, draw, columns=3, size=(5.5, 3.6))


def plot_lines(path, panels, *, xlabel, ylabel="top-1 (%)"):
    """Line charts over a log2 x axis (e.g. shots per class), one panel each, as a PNG,
    atomically (process 0 only). `panels`: {panel title: {series name: [(x, y, error
    half-length), ...]}}."""
    _plot_errorbars(path, panels, xlabel=xlabel, ylabel=ylabel, lines=True)


def plot_points(path, panels, *, xlabel, ylabel="top-1 (%)"):
    """Points with vertical error bars over a linear x axis (e.g. a cost), one panel each,
    as a PNG, atomically (process 0 only); `panels` as `plot_lines`'."""
    _plot_errorbars(path, panels, xlabel=xlabel, ylabel=ylabel, lines=False)


def _plot_errorbars(path, panels, *, xlabel, ylabel, lines):
    if jax.process_index() != 0:
        return

    def draw(axis, title, series):
        for name, points in series.items():
            if points:
                xs, ys, errs = zip(*points)
                axis.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name,
                              linestyle="-" if lines else "none")
        if lines:
            xs = sorted({p[0] for points in series.values() for p in points})
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)

    if lines:
        _plot_panels(path, panels, draw, columns=4, size=(4, 3.2))
    else:
        _plot_panels(path, panels, draw, columns=3, size=(5.5, 4))
