r"""Runs a grid of `main.py` jobs (method x dataset x bits x seed) and collects their results.

    python experiments/sweep.py --out=sweeps/demo_seeds --methods=default --seeds=0,1,2
    python experiments/sweep.py --out=sweeps/cifar100 --methods=ptq,p4q,coop_fp \
        --datasets=cifar100 --qconfigs=w8a8,w4a4attn8 --seeds=1,2,3 \
        --set=model.checkpoint=ViT-B-32.pt --set=data.data_dir=/data/tfds

Each grid point is one `python main.py` run in OUT/<method>/<dataset>/<bits>/seed<seed> (an axis
left empty keeps the config's own value and adds no directory level). A point whose
`results.json` exists is not run again, so a sweep that was stopped picks up where it was; a
point that fails is reported and the others still run. Then every row of every `results.json`
is collected into OUT/results.md (mean +- standard deviation over seeds, and each run) and one
top-1 bar chart per dataset (OUT/top1_<dataset>.png).

Methods are config files: a name in `METHODS`, or a path (`configs/x.py` or `configs/x.py:arg`).
"""
import collections
import dataclasses
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from p4q_jax import results

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = {
    "default": "configs/default.py",
    "zeroshot": "configs/zeroshot.py",
    "ptq": "configs/ptq.py",
    "p4q": "configs/p4q.py",
    "coop_fp": "configs/baselines.py:coop_fp",
    "coop_ptq": "configs/baselines.py:coop_ptq",
    "prompts_only": "configs/ablations.py:prompts_only",
    "adapter_only": "configs/ablations.py:adapter_only",
    "no_distillation": "configs/ablations.py:no_distillation",
}

_OUT = flags.DEFINE_string("out", None, "Directory of the sweep's runs and reports.",
                           required=True)
_METHODS = flags.DEFINE_list("methods", ["p4q"], f"Configs to run: {sorted(METHODS)} or paths.")
_DATASETS = flags.DEFINE_list("datasets", [], "config.data.name values (empty: the config's).")
_QCONFIGS = flags.DEFINE_list("qconfigs", [], "config.quant.config values (empty: the config's).")
_SEEDS = flags.DEFINE_list("seeds", [], "config.seed values (empty: the config's).")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE for every run (--config.FIELD=VALUE).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only collect existing results.")


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: its axis values (None: the config's own) and its command."""

    method: str
    dataset: str | None
    qconfig: str | None
    seed: int | None

    def workdir(self, out):
        parts = [self.method, self.dataset, self.qconfig,
                 None if self.seed is None else f"seed{self.seed}"]
        return pathlib.Path(out).joinpath(*[p for p in parts if p is not None])

    def command(self, out, extra=()):
        config = METHODS.get(self.method, self.method)
        argv = [sys.executable, str(REPO / "main.py"), f"--config={REPO / config}",
                f"--workdir={self.workdir(out)}"]
        for field, value in (("data.name", self.dataset), ("quant.config", self.qconfig),
                             ("seed", self.seed)):
            if value is not None:
                argv.append(f"--config.{field}={value}")
        return argv + [f"--config.{s}" for s in extra]


def grid(methods, datasets, qconfigs, seeds):
    """Every combination of the axes (an empty axis stands for the config's own value)."""
    return [Point(m, d, q, None if s is None else int(s))
            for m in methods for d in datasets or [None] for q in qconfigs or [None]
            for s in seeds or [None]]


def run_points(points, out, extra=()):
    """Runs each point's main.py whose results.json is missing -> the points that failed."""
    failed = []
    for i, point in enumerate(points):
        workdir = point.workdir(out)
        if (workdir / "results.json").exists():
            logging.info("[%d/%d] %s: done before, skipped", i + 1, len(points), workdir)
            continue
        workdir.mkdir(parents=True, exist_ok=True)
        logging.info("[%d/%d] %s", i + 1, len(points), " ".join(point.command(out, extra)))
        start = time.time()
        with open(workdir / "main.log", "w") as log:
            code = subprocess.call(point.command(out, extra), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
        logging.info("[%d/%d] %s in %.0f s", i + 1, len(points),
                     "done" if code == 0 else f"FAILED (exit {code}, see main.log)",
                     time.time() - start)
        if code:
            failed.append(point)
    return failed


def collect(points, out):
    """Every row of every finished point -> a list of flat records (one per row)."""
    records = []
    for point in points:
        path = point.workdir(out) / "results.json"
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        for row in run["rows"]:
            records.append({
                "method": point.method, "dataset": run["dataset"],
                "qconfig": row.get("qconfig") or "fp32",
                "seed": point.seed, "row": row["method"], "top1": row["top1"],
                "top5": row["top5"], "workdir": str(point.workdir(out))})
    return records


def summarize(records):
    """Records grouped by (dataset, bits, row method) -> mean, std (ddof=0) and count."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["qconfig"], r["row"])].append(r)
    summary = []
    for (dataset, qconfig, row), members in groups.items():
        # A row that several runs share (e.g. the FP zero-shot of each setting) counts once per
        # seed: runs with the same seed give it the same value.
        by_seed = {}
        for m in members:
            by_seed.setdefault(m["seed"], m)
        top1 = np.array([m["top1"] for m in by_seed.values()])
        top5 = np.array([m["top5"] for m in by_seed.values()])
        summary.append({"dataset": dataset, "qconfig": qconfig, "row": row,
                        "top1_mean": float(top1.mean()), "top1_std": float(top1.std()),
                        "top5_mean": float(top5.mean()), "top5_std": float(top5.std()),
                        "n": len(by_seed)})
    return summary


def report(records, summary, out):
    """Writes OUT/results.md, OUT/results.json and a top-1 chart per dataset -> the markdown."""
    out = pathlib.Path(out)
    text = "## Mean +- standard deviation over seeds\n\n" + results.markdown_table(
        ["dataset", "bits", "method", "top-1 (%)", "top-5 (%)", "runs"],
        [[s["dataset"], s["qconfig"], s["row"], f"{s['top1_mean']:.2f} +- {s['top1_std']:.2f}",
          f"{s['top5_mean']:.2f} +- {s['top5_std']:.2f}", s["n"]] for s in summary])
    text += "\n## Runs\n\n" + results.markdown_table(
        ["dataset", "bits", "method", "seed", "top-1 (%)", "top-5 (%)", "workdir"],
        [[r["dataset"], r["qconfig"], r["row"], r["seed"], f"{r['top1']:.2f}",
          f"{r['top5']:.2f}", r["workdir"]] for r in records])
    results.write_text(out / "results.md", text)
    results.write_json(out / "results.json", {"summary": summary, "runs": records})
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [m for m in _METHODS.value if m not in METHODS
               and not (REPO / m.split(":")[0]).is_file()]
    if unknown:
        raise app.UsageError(f"--methods: {unknown} are neither {sorted(METHODS)} nor config "
                             "files under the repository.")
    points = grid(_METHODS.value, _DATASETS.value, _QCONFIGS.value, _SEEDS.value)
    if _DRY_RUN.value:
        for point in points:
            print(" ".join(point.command(_OUT.value, _SET.value)))
        return 0
    failed = [] if _COLLECT_ONLY.value else run_points(points, _OUT.value, _SET.value)
    records = collect(points, _OUT.value)
    if not records:
        raise SystemExit(f"no results.json under {_OUT.value} to collect.")
    print(report(records, summarize(records), _OUT.value))
    if failed:
        logging.error("%d of %d runs failed: %s", len(failed), len(points),
                      ", ".join(str(p.workdir(_OUT.value)) for p in failed))
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
