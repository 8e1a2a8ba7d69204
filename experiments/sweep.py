r"""Runs a grid of `main.py` jobs (method x dataset x bits x seed) and collects their results.

    python experiments/sweep.py --out=sweeps/demo_seeds --methods=default --seeds=0,1,2
    python experiments/sweep.py --out=sweeps/cifar100 --methods=ptq,p4q,coop_fp \
        --datasets=cifar100 --qconfigs=w8a8,w4a4attn8 --seeds=1,2,3 \
        --set=model.checkpoint=ViT-B-32.pt --set=data.data_dir=/data/tfds
    python experiments/sweep.py --out=sweeps/coop --preset=coop_fewshot \
        --set=model.checkpoint=ViT-B-16.pt --set=data.root=$DATA

Each grid point is one `python main.py` run in
OUT/<method>/<dataset>[/<subsample>]/<bits>[/<shots>shots]/seed<seed> (an axis left empty keeps
the config's own value and adds no directory level), with its settings (axis values and
`--set` fields) in sweep_point.json. A point whose `results.json` exists and whose settings
are the same is not run again, so a sweep that was stopped picks up where it was; a point
whose settings changed (or were not recorded) is run again, its earlier run moved to
<workdir>/previous/<time>/ first. A point that fails is reported and the others still run.
Then every row of every `results.json` is collected into OUT/results.md (mean +- standard
deviation over seeds, and each run) and one top-1 bar chart per dataset
(OUT/top1_<dataset>.png).

Methods are config files: a name in `METHODS`, or a path (`configs/x.py` or `configs/x.py:arg`).

`--preset=demo` is the offline demo's grid (`configs/default.py:grid`: FP zero-shot, CoOp-FP,
FP P4Q, PTQ and P4Q at w8a8 and w4a4attn8, and the 4-bit ablations: which parts train x the
distillation, and KL from the zero-shot and from the trained FP teacher) and its control on
the unshifted task (`configs/default.py:shapes_control`), over seeds 0, 1, 2, reported as the
paper lays them out: the main table, the ablation grid and the paper's claims checked on the
means, each with its margin in standard deviations.

`--preset=coop_fewshot` is CoOp's few-shot table: {zero-shot, CoOp-FP, PTQ, P4Q} (the
`configs/coop_fewshot.py` variants; zero-shot and PTQ are rows of those runs) x CoOp's 11
datasets x shots {1, 2, 4, 8, 16} x seeds {1, 2, 3}, each seed both `seed` and the few-shot
draw's `data.shot_seed`, as CoOp's `--seed`. With a shots axis the report adds, per shots,
CoOp's table (method x dataset, mean +- std over seeds, and the average over datasets) and
OUT/top1_vs_shots.png (a panel per dataset and one for the average). `--preset=base_to_new`
trains on the base half of each dataset's classes (16 shots) and writes CoCoOp's base / new /
H tables and OUT/base_to_new.png. `--preset=cross_dataset` and `--preset=domain_generalization`
train on 16-shot ImageNet, evaluate each export (`--mode=eval`, in the run's transfer/<target>/)
on the 10 other datasets or on ImageNet-V2, -Sketch, -A and -R, run zero-shot CLIP on every
target, and write the transfer table (source, targets, target average) and OUT/transfer.png.
`--preset=methods` runs `configs/methods.py` (FP zero-shot, CoOp-FP, PTQ, QwT, P4Q, QwT + P4Q
and QAT in one process) at w8a8 and w4a4attn8 over seeds 0, 1, 2, on the demo's task or on
`--datasets` (e.g. coop/dtd with --set=data.root=$DATA), and adds the methods table (top-1 mean
+- std and the cost columns: trainable parameters, calibration and training seconds, peak
memory, bytes on disk) and OUT/top1_vs_cost.png (top-1 against calibration + training
seconds). Any sweep whose rows carry the cost columns gets them.
Flags given explicitly replace the preset's axes (`--subsample` its half, `--targets` its
transfer targets), e.g. a shortened base-to-new table on two datasets and one seed:

    python experiments/sweep.py --out=sweeps/b2n --preset=base_to_new --seeds=1 \
        --datasets=coop/dtd,coop/eurosat --set=data.root=$DATA --set=model.checkpoint=ViT-B-16.pt
"""
import dataclasses
import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from p4q_jax import atomic
from p4q_jax import checkpoint
from p4q_jax import costs
from p4q_jax import results
from p4q_jax import tables
from p4q_jax.configs import ablations
from p4q_jax.configs import baselines
from p4q_jax.configs import coop_fewshot
from p4q_jax.configs import methods as methods_config
from p4q_jax.data import coop

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = {
    "default": "configs/default.py",
    "zeroshot": "configs/zeroshot.py",
    "ptq": "configs/ptq.py",
    "p4q": "configs/p4q.py",
    "methods": "configs/methods.py",
    **{name: f"configs/baselines.py:{name}" for name in baselines.VARIANTS},
    # kl_trained_teacher needs --set=loss.teacher=PATH (a trained FP export)
    **{name: f"configs/ablations.py:{name}" for name in ablations.VARIANTS},
}
_FEWSHOT_METHODS = [f"configs/coop_fewshot.py:{v}" for v in coop_fewshot.VARIANTS]
# CoOp's 11 datasets: `data.coop`'s, less ImageNet's test-only variants.
COOP_DATASETS = tuple(name for name in coop.NAMES if name not in coop.TEST_ONLY)
PRESETS = {
    # The demo's grid (main rows and 4-bit ablations, one process per seed) and its control on
    # the unshifted task, over three seeds: the paper's tables in miniature.
    "demo": {
        "methods": ["configs/default.py:grid", "configs/default.py:shapes_control"],
        "datasets": [],
        "shots": [],
        "seeds": ["0", "1", "2"],
    },
    "coop_fewshot": {
        "methods": _FEWSHOT_METHODS,
        "datasets": [f"{coop.PREFIX}{name}" for name in COOP_DATASETS],
        "shots": ["1", "2", "4", "8", "16"],
        "seeds": ["1", "2", "3"],
        "seed_fields": ("seed", "data.shot_seed"),
    },
    # CoCoOp's base-to-new: 16 shots of the base half; each run also tests the new half.
    "base_to_new": {
        "methods": _FEWSHOT_METHODS,
        "datasets": [f"{coop.PREFIX}{name}" for name in COOP_DATASETS],
        "shots": ["16"],
        "seeds": ["1", "2", "3"],
        "seed_fields": ("seed", "data.shot_seed"),
        "subsample": "base",
    },
    # CoCoOp's cross-dataset transfer: trained on 16-shot ImageNet, evaluated on the others.
    "cross_dataset": {
        "methods": _FEWSHOT_METHODS,
        "datasets": ["coop/imagenet"],
        "shots": ["16"],
        "seeds": ["1", "2", "3"],
        "seed_fields": ("seed", "data.shot_seed"),
        "transfer_to": [f"{coop.PREFIX}{name}" for name in COOP_DATASETS
                        if name != "imagenet"],
    },
    # Domain generalization: the same ImageNet runs on ImageNet's test-only variants.
    "domain_generalization": {
        "methods": _FEWSHOT_METHODS,
        "datasets": ["coop/imagenet"],
        "shots": ["16"],
        "seeds": ["1", "2", "3"],
        "seed_fields": ("seed", "data.shot_seed"),
        "transfer_to": [f"{coop.PREFIX}{name}" for name in coop.TEST_ONLY],
    },
    # Every method with its cost (configs/methods.py) at each of its bit settings, on the
    # config's task (the demo's) or on --datasets such as coop/dtd (with --set=data.root=).
    "methods": {
        "methods": [f"configs/methods.py:{bits}" for bits in methods_config.VARIANTS],
        "datasets": [],
        "shots": [],
        "seeds": ["0", "1", "2"],
    },
}

_OUT = flags.DEFINE_string("out", None, "Directory of the sweep's runs and reports.",
                           required=True)
_METHODS = flags.DEFINE_list("methods", ["p4q"], f"Configs to run: {sorted(METHODS)} or paths.")
_DATASETS = flags.DEFINE_list("datasets", [], "config.data.name values (empty: the config's).")
_QCONFIGS = flags.DEFINE_list("qconfigs", [], "config.quant.config values (empty: the config's).")
_SEEDS = flags.DEFINE_list("seeds", [], "config.seed values (empty: the config's).")
_SHOTS = flags.DEFINE_list("shots", [], "config.data.num_shots values (empty: the config's).")
_SUBSAMPLE = flags.DEFINE_enum("subsample", None, ["all", "base", "new"],
                               "config.data.subsample of every training run (unset: the config's).")
_TARGETS = flags.DEFINE_list("targets", [], "Datasets each export is evaluated on (--mode=eval); "
                             "with a transfer preset, replaces its targets.")
_PRESET = flags.DEFINE_enum("preset", None, sorted(PRESETS), "A predefined grid (see above).")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE for every run (--config.FIELD=VALUE).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only collect existing results.")
SETTINGS = "sweep_point.json"


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: its axis values (None: the config's own) and its command."""

    method: str
    dataset: str | None
    qconfig: str | None
    seed: int | None
    shots: int | None = None
    seed_fields: tuple = ("seed",)  # the config fields the seed sets
    subsample: str | None = None  # data.subsample: base-to-new runs get their own directory
    source: "Point | None" = None  # set: the source point's export evaluated on `dataset`
    mode: str | None = None  # main.py's --mode (None: the config's)

    def settings(self, extra=()):
        """What decides this point's results: its axis values (a transfer's with its
        source's) and the `--set` fields, as stored in SETTINGS."""
        return json.loads(json.dumps({"point": dataclasses.asdict(self), "set": list(extra)}))

    @property
    def results_file(self):
        return "eval_results.json" if self.source else "results.json"

    def workdir(self, out):
        if self.source:
            return self.source.workdir(out) / "transfer" / self.dataset.replace("/", "_")
        method = self.mode or (
            self.method.replace("configs/", "").replace(".py", "").replace(":", "_"))
        parts = [method, self.dataset, self.subsample, self.qconfig,
                 None if self.shots is None else f"{self.shots}shots",
                 None if self.seed is None else f"seed{self.seed}"]
        return pathlib.Path(out).joinpath(*[p for p in parts if p is not None])

    def command(self, out, extra=()):
        config = METHODS.get(self.method, self.method)
        argv = [sys.executable, str(REPO / "main.py"), f"--config={REPO / config}",
                f"--workdir={self.workdir(out)}"]
        if self.mode:
            argv.append(f"--mode={self.mode}")
        if self.source:
            argv.append(f"--config.p4q.export_dir={self.source.workdir(out) / 'export'}")
        fields = [("data.name", self.dataset), ("data.subsample", self.subsample),
                  ("quant.config", self.qconfig), ("data.num_shots", self.shots)]
        fields += [(field, self.seed) for field in self.seed_fields]
        for field, value in fields:
            if value is not None:
                argv.append(f"--config.{field}={value}")
        return argv + [f"--config.{s}" for s in extra]


def grid(methods, datasets, qconfigs, seeds, shots=(), seed_fields=("seed",), subsample=None):
    """Every combination of the axes (an empty axis stands for the config's own value)."""
    return [Point(m, d, q, None if s is None else int(s), None if k is None else int(k),
                  tuple(seed_fields), subsample)
            for m in methods for d in datasets or [None] for q in qconfigs or [None]
            for k in shots or [None] for s in seeds or [None]]


def _environment(out):
    """The runs' environment: JAX's persistent compilation cache in OUT/xla_cache (unless one
    is set), so the points' identical programs (another seed, say) compile once."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(out).absolute() / "xla_cache"))
    return env


def stored_settings(point, out):
    """The settings recorded in a point's workdir (None: none recorded)."""
    try:
        return json.loads((point.workdir(out) / SETTINGS).read_text())
    except (OSError, ValueError):
        return None


def _move_aside(workdir):
    """Moves a point's earlier run (all but previous/ and the transfer/ points under it) to
    WORKDIR/previous/<time>/ -> that folder."""
    names = [glob.escape(p.name) for p in sorted(workdir.iterdir())
             if p.name not in ("previous", "transfer")]
    return checkpoint.move_run_aside(workdir, outputs=names)


def run_points(points, out, extra=()):
    """Runs each point's main.py unless its results file exists with the same settings (a
    point whose settings changed has its earlier run moved aside first) -> the points that
    failed."""
    failed = []
    for i, point in enumerate(points):
        workdir = point.workdir(out)
        settings, stored = point.settings(extra), stored_settings(point, out)
        done = (workdir / point.results_file).exists()
        if done and stored == settings:
            logging.info("[%d/%d] %s: done before, skipped", i + 1, len(points), workdir)
            continue
        if stored != settings and (done or stored is not None):
            why = ("its settings were not recorded" if stored is None else
                   "its settings changed: " + "; ".join(checkpoint.differences(
                       _flat(stored), _flat(settings))))
            logging.warning("[%d/%d] %s: run again, %s; the earlier run moved to %s", i + 1,
                            len(points), workdir, why, _move_aside(workdir))
        workdir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(workdir / SETTINGS, json.dumps(settings, indent=2) + "\n")
        logging.info("[%d/%d] %s", i + 1, len(points), " ".join(point.command(out, extra)))
        start = time.time()
        with open(workdir / "main.log", "w") as log:
            code = subprocess.call(point.command(out, extra), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT, env=_environment(out))
        logging.info("[%d/%d] %s in %.0f s", i + 1, len(points),
                     "done" if code == 0 else f"FAILED (exit {code}, see main.log)",
                     time.time() - start)
        if code:
            failed.append(point)
    return failed


def _flat(settings):
    return {**settings["point"], "set": settings["set"]}


def collect(points, out, extra=()):
    """Every row of every finished point -> a list of flat records (one per row). A point
    whose recorded settings differ from `extra` and its axis values is left out, with a
    warning (its results are of another sweep)."""
    records = []
    for point in points:
        path = point.workdir(out) / point.results_file
        if not path.exists():
            continue
        stored = stored_settings(point, out)
        if stored is not None and stored != point.settings(extra):
            logging.warning("%s: left out, its results are of other settings (%s); rerun the "
                            "sweep without --collect_only to redo it", point.workdir(out),
                            "; ".join(checkpoint.differences(_flat(stored),
                                                             _flat(point.settings(extra)))))
            continue
        run = json.loads(path.read_text())
        for row in run["rows"]:
            records.append({
                "method": point.method, "dataset": run["dataset"],
                "source": point.source.dataset if point.source else None,
                "qconfig": row.get("qconfig") or "fp32",
                "seed": point.seed, "shots": point.shots, "row": row["method"],
                "top1": row["top1"], "top5": row["top5"],
                # base-to-new runs: the accuracy on the new half and the harmonic mean
                "new_top1": row["new"]["top1"] if "new" in row else None, "hm": row.get("hm"),
                "recipe": row.get("recipe"), "workdir": str(point.workdir(out)),
                **{field: row.get(field) for field in costs.FIELDS}})
    return records


def with_transfers(points, targets):
    """`points`, then each one's export evaluated on every target, then zero-shot CLIP on
    every target (the training runs hold the source's zero-shot and PTQ rows). Zero-shot runs
    the first point's config in --mode=zeroshot, so that its prompts (templates, class-name
    layout) are the ones the source's zero-shot row used."""
    transfers = [dataclasses.replace(p, dataset=t, subsample=None, source=p, mode="eval")
                 for p in points for t in targets]
    zeroshots = [Point(points[0].method, t, None, None, mode="zeroshot") for t in targets]
    return [*points, *transfers, *zeroshots]


def plot_base_to_new(path, b2n):
    """Base / new / H bars per method, a chart per dataset and the average, in one PNG."""
    panels = {}
    for dataset, (_, rows) in b2n.items():
        panels[dataset] = {row[0]: [float(cell.split(" ")[0]) for cell in row[1:]]
                           for row in rows}
    results.plot_bar_panels(path, panels, groups=["base", "new", "H"])


def plot_shots(path, summary):
    """Top-1 vs shots: a panel per dataset and one for the average over datasets."""
    labels = list(dict.fromkeys(tables.method_label(s) for s in summary))
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    panels = {}
    for dataset in datasets:
        panels[dataset] = {label: sorted(
            (s["shots"], s["top1_mean"], s["top1_std"]) for s in summary
            if s["dataset"] == dataset and tables.method_label(s) == label
            and s["shots"] is not None)
            for label in labels}
    average = {}
    for label in labels:
        points = []
        for shots in sorted({s["shots"] for s in summary if s["shots"] is not None}):
            means = [s["top1_mean"] for s in summary
                     if s["shots"] == shots and tables.method_label(s) == label]
            if len(means) == len(datasets):
                points.append((shots, float(np.mean(means)), 0.0))
        average[label] = points
    panels["average"] = average
    results.plot_lines(path, panels, xlabel="shots per class", ylabel="top-1 (%)")


def report(records, summary, out, targets=()):
    """Writes OUT/results.md, OUT/results.json and a top-1 chart per dataset (with a shots
    axis: CoOp's tables and OUT/top1_vs_shots.png; with transfer `targets`: the transfer
    table and OUT/transfer.png) -> the markdown."""
    out = pathlib.Path(out)
    text = ""
    if targets:
        sources = list(dict.fromkeys(r["source"] for r in records if r["source"]))
        header, rows, plotted = tables.transfer_table(summary, sources, list(targets))
        text += ("## Transfer from " + ", ".join(sources) + ": top-1 (%), mean +- std over "
                 "seeds\n\n" + results.markdown_table(header, rows) + "\n")
    b2n = tables.base_to_new_tables(summary)
    for dataset, (header, rows) in b2n.items():
        text += (f"## Base-to-new, {dataset}: top-1 (%), mean +- std over seeds\n\n"
                 + results.markdown_table(header, rows) + "\n")
    for title, (header, rows) in tables.demo_tables(summary).items():
        text += f"## {title}\n\n" + results.markdown_table(header, rows) + "\n"
    header, claims = tables.demo_claims(summary)
    if claims:
        text += ("## The paper's claims on these means\n\n"
                 + results.markdown_table(header, claims) + "\n")
    for shots, (header, rows) in ({} if b2n or targets else tables.shots_tables(summary)).items():
        text += (f"## {shots} shots: top-1 (%), mean +- std over seeds\n\n"
                 + results.markdown_table(header, rows) + "\n")
    costed = [s for s in summary if s["shots"] is None]
    cost_header, cost_rows = tables.methods_table(costed)
    if cost_rows:
        text += ("## Methods and their cost: means over seeds\n\n"
                 + results.markdown_table(cost_header, cost_rows) + "\n")
    text += "## Mean +- standard deviation over seeds\n\n" + results.markdown_table(
        ["dataset", "shots", "bits", "method", "top-1 (%)", "top-5 (%)", "runs"],
        [[s["dataset"], "-" if s["shots"] is None else s["shots"], s["qconfig"], s["row"],
          f"{s['top1_mean']:.2f} +- {s['top1_std']:.2f}",
          f"{s['top5_mean']:.2f} +- {s['top5_std']:.2f}", s["n"]] for s in summary])
    text += "\n## Runs\n\n" + results.markdown_table(
        ["dataset", "shots", "bits", "method", "seed", "top-1 (%)", "top-5 (%)", "workdir"],
        [[r["dataset"], "-" if r.get("shots") is None else r["shots"], r["qconfig"], r["row"],
          r["seed"], f"{r['top1']:.2f}", f"{r['top5']:.2f}", r["workdir"]] for r in records])
    results.write_text(out / "results.md", text)
    results.write_json(out / "results.json", {"summary": summary, "runs": records})
    if cost_rows:
        tables.plot_methods(out / "top1_vs_cost.png", costed)
    if targets:
        results.plot_bars(out / "transfer.png", header[1:], plotted,
                          title="top-1 (mean over seeds)")
        return text
    if b2n:
        plot_base_to_new(out / "base_to_new.png", b2n)
        return text
    if any(s["shots"] is not None for s in summary):
        plot_shots(out / "top1_vs_shots.png", summary)
        return text
    for dataset in sorted({s["dataset"] for s in summary}):
        rows = [s for s in summary if s["dataset"] == dataset]
        bits = list(dict.fromkeys(s["qconfig"] for s in rows))
        methods = list(dict.fromkeys(s["row"] for s in rows))
        value = {(s["qconfig"], s["row"]): s for s in rows}
        results.plot_bars(
            out / f"top1_{dataset}.png", bits,
            {m: [value[(b, m)]["top1_mean"] if (b, m) in value else None for b in bits]
             for m in methods},
            errors={m: [value[(b, m)]["top1_std"] if (b, m) in value else None for b in bits]
                    for m in methods},
            title=f"{dataset}: top-1 (mean +- std over seeds)")
    return text


def integers(flag, values):
    """--FLAG's values as integers; a UsageError naming the flag and the bad value."""
    bad = [v for v in values if not str(v).strip().lstrip("-").isdigit()]
    if bad:
        raise app.UsageError(f"--{flag}: {', '.join(map(repr, bad))} is not an integer "
                             f"(expected a comma-separated list such as --{flag}=1,2,3)")
    return [int(v) for v in values]


def _load_config(method):
    """The config a method runs (`get_config(arg)` of its file)."""
    path, _, arg = METHODS.get(method, method).partition(":")
    spec = importlib.util.spec_from_file_location("sweep_method_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_set(methods, extra):
    """A UsageError for a --set that is not FIELD=VALUE or names a field that a method's
    config lacks, naming the field and the fields its section has."""
    problems = []
    for entry in extra:
        field, equals, _ = entry.partition("=")
        if not equals or not field:
            problems.append(f"--set={entry}: expected FIELD=VALUE, e.g. --set=train.num_steps=10")
            continue
        for method in methods:
            node, where = _load_config(method), ""
            for name in field.split("."):
                if not hasattr(node, "keys") or name not in node:
                    known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                    problems.append(f"--set={entry}: the {method} config has no field "
                                    f"{where + name!r} (the fields of "
                                    f"{where.rstrip('.') or 'the config'}: {known})")
                    break
                node, where = node[name], f"{where}{name}."
    if problems:
        raise app.UsageError("\n".join(dict.fromkeys(problems)))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    preset = PRESETS.get(_PRESET.value, {})
    axes = {name: flag.value if flag.present or not preset else preset[name]
            for name, flag in (("methods", _METHODS), ("datasets", _DATASETS),
                               ("shots", _SHOTS), ("seeds", _SEEDS))}
    unknown = [m for m in axes["methods"] if m not in METHODS
               and not (REPO / m.split(":")[0]).is_file()]
    if unknown:
        raise app.UsageError(f"--methods: {unknown} are neither {sorted(METHODS)} nor config "
                             "files under the repository.")
    subsample = _SUBSAMPLE.value or preset.get("subsample")
    points = grid(axes["methods"], axes["datasets"], _QCONFIGS.value,
                  integers("seeds", axes["seeds"]), integers("shots", axes["shots"]),
                  preset.get("seed_fields", ("seed",)), subsample)
    targets = _TARGETS.value or preset.get("transfer_to", [])
    if targets:
        points = with_transfers(points, targets)
    extra = _SET.value
    check_set(axes["methods"], extra)
    out = os.path.abspath(_OUT.value)  # main.py runs in the repository, the sweep anywhere
    if _DRY_RUN.value:
        for point in points:
            print(" ".join(point.command(out, extra)))
        return 0
    failed = [] if _COLLECT_ONLY.value else run_points(points, out, extra)
    records = collect(points, out, extra)
    if not records:
        raise SystemExit(f"no results.json under {out} to collect.")
    print(report(records, tables.summarize(records), out, targets))
    if failed:
        logging.error("%d of %d runs failed: %s", len(failed), len(points),
                      ", ".join(str(p.workdir(out)) for p in failed))
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
