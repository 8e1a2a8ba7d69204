"""Result tables: every table a run or a sweep prints, built here from results rows.

`demo_table` is the demo's (and `configs/methods.py`'s) table of one run's rows;
`summarize` groups a sweep's rows (one record per row of every run) by dataset, shots, bits
and method into means and standard deviations over seeds, and the other tables read that
summary: the demo's main table, ablation grid and claims, CoOp's few-shot tables, CoCoOp's
base-to-new and transfer tables, and the methods comparison with its cost columns. Every
row kind has one name in all of them (`p4q.variants.row_label`).
"""

import collections

import numpy as np

from p4q_jax import costs
from p4q_jax import results
from p4q_jax.p4q import variants


def demo_table(rows):
    """The demo's table (markdown) of one run's rows: accuracy and the cost columns."""
    return results.markdown_table(
        ["bits", "method", "top-1 (%)", "top-5 (%)", "trainable params",
         "calibration + training (s)", "peak RSS (GB)", "size on disk (bytes)"],
        [[row.get("qconfig") or "fp32", variants.row_label(row["method"]), f"{row['top1']:.2f}",
          f"{row['top5']:.2f}", *_cost_cells(row, ("trainable_params", "wall_seconds",
                                                    "peak_rss_gb", "bytes"))]
         for row in rows])


_FORMATS = {"trainable_params": "{:,.0f}", "compensation_params": "{:,.0f}",
            "calibration_seconds": "{:.1f}", "training_seconds": "{:.1f}",
            "wall_seconds": "{:.1f}", "peak_rss_gb": "{:.2f}", "bytes": "{:,.0f}"}


def _cost_cells(row, fields, suffix=""):
    """`row[field + suffix]` of each cost field, formatted ("-" where the row has none)."""
    return ["-" if row.get(f + suffix) is None else _FORMATS[f].format(row[f + suffix])
            for f in fields]


def summarize(records):
    """Records grouped by (dataset, shots, bits, row method) -> mean, std (ddof=0), count;
    with the cost columns (`costs.FIELDS`) where every run of the group has them, their
    mean and std too ("<field>_mean", "<field>_std")."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r["dataset"], r.get("shots"), r["qconfig"], r["row"])].append(r)
    summary = []
    for (dataset, shots, qconfig, row), members in groups.items():
        # A row that several runs share (e.g. the FP zero-shot of each setting) counts once per
        # seed: runs with the same seed give it the same value.
        by_seed = {}
        for m in members:
            by_seed.setdefault(m["seed"], m)
        top1 = np.array([m["top1"] for m in by_seed.values()])
        top5 = np.array([m["top5"] for m in by_seed.values()])
        summary.append({"dataset": dataset, "shots": shots, "qconfig": qconfig, "row": row,
                        "top1_mean": float(top1.mean()), "top1_std": float(top1.std()),
                        "top5_mean": float(top5.mean()), "top5_std": float(top5.std()),
                        "n": len(by_seed), "recipe": members[0].get("recipe"),
                        "top1_runs": [float(t) for t in top1]})
        if all(m.get("new_top1") is not None for m in by_seed.values()):
            for key in ("new_top1", "hm"):
                values = np.array([m[key] for m in by_seed.values()])
                summary[-1].update({f"{key}_mean": float(values.mean()),
                                    f"{key}_std": float(values.std())})
        for key in costs.FIELDS:
            if all(m.get(key) is not None for m in by_seed.values()):
                values = np.array([m[key] for m in by_seed.values()], np.float64)
                summary[-1].update({f"{key}_mean": float(values.mean()),
                                    f"{key}_std": float(values.std())})
    return summary


def methods_table(summary):
    """The methods comparison (`configs/methods.py` over seeds) -> (header, rows): a row per
    dataset, bits and method that has cost columns: top-1 mean +- std over seeds, then the
    means of the trainable and compensation parameters, calibration and training seconds
    (+- std of their sum), peak resident memory and bytes on disk."""
    entries = [s for s in summary if "wall_seconds_mean" in s]
    header = ["dataset", "bits", "method", "top-1 (%)", "trainable params",
              "QwT params", "calibration (s)", "training (s)", "calibration + training (s)",
              "peak RSS (GB)", "size on disk (bytes)", "runs"]
    rows = [[s["dataset"], s["qconfig"], variants.row_label(s["row"]), _mean_std(s),
             *_cost_cells(s, ("trainable_params", "compensation_params", "calibration_seconds",
                              "training_seconds"), "_mean"),
             f"{s['wall_seconds_mean']:.1f} +- {s['wall_seconds_std']:.1f}",
             *_cost_cells(s, ("peak_rss_gb", "bytes"), "_mean"), s["n"]]
            for s in sorted(entries, key=lambda s: (s["dataset"], s["qconfig"] != "fp32",
                                                    s["qconfig"]))]
    return header, rows


def plot_methods(path, summary):
    """Top-1 against calibration + training seconds (means over seeds, top-1 std as error
    bars): a panel per dataset, a series per method label with its bits."""
    panels = {}
    for s in summary:
        if "wall_seconds_mean" in s:
            panels.setdefault(s["dataset"], {}).setdefault(method_label(s), []).append(
                (s["wall_seconds_mean"], s["top1_mean"], s["top1_std"]))
    results.plot_points(path, panels, xlabel="calibration + training (s)")


def method_label(entry):
    """A table row's name (`variants.row_label`), with its bits where the row has them."""
    label = variants.row_label(entry["row"])
    if entry["qconfig"] == "fp32" or entry["row"].endswith(entry["qconfig"]):
        return label
    return f"{label} {entry['qconfig']}"


_MAIN_ROWS = ("fp_zeroshot", "coop_fp", "fp_p4q", "ptq", "p4q")


def _mean_std(entry):
    return f"{entry['top1_mean']:.2f} +- {entry['top1_std']:.2f}"


def _per_seed(entry):
    return " / ".join(f"{t:.2f}" for t in entry["top1_runs"])


def _recipe_cells(entry):
    """(prompts, adapter, distillation, teacher) of a row, from the recipe it records."""
    recipe = entry.get("recipe")
    if not recipe:
        return ["-", "-", "-", "-"]
    teacher = recipe.get("teacher")
    if teacher is None:
        teacher_name = "-"
    elif teacher["kind"] == "zeroshot":
        teacher_name = f"FP zero-shot ({teacher['train_top1']:.1f} / {teacher['test_top1']:.1f})"
    else:
        teacher_name = (f"{variants.row_label(teacher['method'])} "
                        f"({teacher['train_top1']:.1f} / {teacher['test_top1']:.1f})")
    return [recipe["prompts"].split(" ")[0], "8-bit" if recipe["adapter"] else "-",
            recipe["distillation"], teacher_name]


def _demo_entries(summary):
    """{dataset: its entries} of the datasets whose runs hold ablation rows (the demo's)."""
    out = {}
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        entries = [s for s in summary if s["dataset"] == dataset and s["shots"] is None]
        if any(s["row"].startswith("p4q_") for s in entries):
            out[dataset] = entries
    return out


def demo_tables(summary):
    """The demo's tables, where the summary has ablation rows: {title: (header, rows)}.

    The main table (a row per method and bits) and, per bit setting the ablations ran at, the
    ablation grid: which parts train (prompts, adapter), the distillation and its teacher
    (with the teacher's top-1 on the train / test split), top-1 mean +- std and per seed."""
    tables = {}
    for dataset, entries in _demo_entries(summary).items():
        main = [s for s in entries if s["row"] in _MAIN_ROWS]
        tables[f"{dataset}: top-1 (%), mean +- std over seeds"] = (
            ["bits", "method", "top-1 (%)", "per seed"],
            [[s["qconfig"], variants.row_label(s["row"]), _mean_std(s), _per_seed(s)]
             for s in main])
        for bits in sorted({s["qconfig"] for s in entries if s["row"].startswith("p4q_")}):
            rows = sorted((s for s in entries if s["qconfig"] == bits
                           and (s["row"] in ("ptq", "p4q") or s["row"].startswith("p4q_"))),
                          key=lambda s: _recipe_cells(s))
            tables[f"{dataset}, {bits}: what each part adds, top-1 (%) over seeds"] = (
                ["prompts", "adapter", "distillation", "teacher (top-1 train / test)",
                 "method", "top-1 (%)", "per seed"],
                [[*_recipe_cells(s), variants.row_label(s["row"]), _mean_std(s), _per_seed(s)]
                 for s in rows])
    return tables


def margin(a, b):
    """(a - b) in standard deviations: over sqrt(std_a^2 + std_b^2), the spread of the
    difference of two independent seeds' runs (inf when both are exact)."""
    spread = float(np.hypot(a["top1_std"], b["top1_std"]))
    diff = a["top1_mean"] - b["top1_mean"]
    return diff / spread if spread else float("inf") * np.sign(diff) if diff else 0.0


# The paper's claims: (claim, row a, row b, bits of a, bits of b); "holds" when a's mean is
# above b's. Rows missing from a sweep are left out.
_CLAIMS = (
    ("learned prompts add to the adapter", "p4q", "p4q_adapter_only", None, None),
    ("the adapter adds to learned prompts", "p4q", "p4q_prompts_only", None, None),
    ("distillation (official) helps", "p4q", "p4q_no_distillation", None, None),
    ("distillation (KL, zero-shot teacher) helps", "p4q_kl_distillation",
     "p4q_no_distillation", None, None),
    ("distillation (KL, trained FP teacher) helps", "p4q_kl_trained_teacher",
     "p4q_no_distillation", None, None),
    ("4-bit P4Q beats FP zero-shot", "p4q", "fp_zeroshot", "w4a4attn8", "fp32"),
    ("8-bit P4Q beats CoOp-FP", "p4q", "coop_fp", "w8a8", "fp32"),
)


def demo_claims(summary):
    """The paper's claims on the demo's means -> (header, rows): claim, dataset, the two
    means, the margin in points and in standard deviations, and whether it holds on the
    means ("(within 1 std)" where the margin is under one standard deviation)."""
    rows = []
    for dataset, entries in _demo_entries(summary).items():
        ablated = {s["qconfig"] for s in entries if s["row"].startswith("p4q_")}
        value = {(s["qconfig"], s["row"]): s for s in entries}
        for claim, a, b, bits_a, bits_b in _CLAIMS:
            for bits in sorted(ablated) if bits_a is None else [bits_a]:
                first, second = value.get((bits, a)), value.get((bits_b or bits, b))
                if first is None or second is None:
                    continue
                diff = first["top1_mean"] - second["top1_mean"]
                spread = margin(first, second)
                verdict = "holds" if diff > 0 else "does not hold"
                if abs(spread) < 1:
                    verdict += " (within 1 std)"
                rows.append([claim, f"{dataset} {bits}", _mean_std(first), _mean_std(second),
                             f"{diff:+.2f}", f"{spread:+.1f}", verdict])
    return ["claim", "task", "a", "b", "a - b (points)", "margin (std)", "on the means"], rows


def shots_tables(summary):
    """CoOp's tables: {shots: (header, rows)}, a row per method (mean +- std over seeds per
    dataset, then the average of the dataset means over the datasets it has all of)."""
    tables = {}
    for shots in sorted({s["shots"] for s in summary if s["shots"] is not None}):
        entries = [s for s in summary if s["shots"] == shots]
        datasets = list(dict.fromkeys(s["dataset"] for s in entries))
        value = {(method_label(s), s["dataset"]): s for s in entries}
        rows = []
        for label in dict.fromkeys(method_label(s) for s in entries):
            means = [value[(label, d)]["top1_mean"] for d in datasets if (label, d) in value]
            cells = [f"{value[(label, d)]['top1_mean']:.2f} +- {value[(label, d)]['top1_std']:.2f}"
                     if (label, d) in value else "-" for d in datasets]
            average = f"{np.mean(means):.2f}" if len(means) == len(datasets) else "-"
            rows.append([label, *cells, average])
        tables[shots] = (["method", *datasets, "average"], rows)
    return tables


def base_to_new_tables(summary):
    """CoCoOp's tables: {dataset or "average": (header, rows)}, a row per method with base,
    new and H top-1 (mean +- std over seeds); the average is over datasets (H of the two
    averages, as CoCoOp)."""
    entries = [s for s in summary if "new_top1_mean" in s]
    datasets = list(dict.fromkeys(s["dataset"] for s in entries))
    header = ["method", "base", "new", "H"]
    tables = {}
    for dataset in datasets:
        tables[dataset] = (header, [
            [method_label(s), f"{s['top1_mean']:.2f} +- {s['top1_std']:.2f}",
             f"{s['new_top1_mean']:.2f} +- {s['new_top1_std']:.2f}",
             f"{s['hm_mean']:.2f} +- {s['hm_std']:.2f}"]
            for s in entries if s["dataset"] == dataset])
    rows = []
    for label in dict.fromkeys(method_label(s) for s in entries):
        mine = [s for s in entries if method_label(s) == label]
        if len(mine) != len(datasets):
            continue
        base = float(np.mean([s["top1_mean"] for s in mine]))
        new = float(np.mean([s["new_top1_mean"] for s in mine]))
        rows.append([label, f"{base:.2f}", f"{new:.2f}",
                     f"{2 * base * new / (base + new) if base + new else 0.0:.2f}"])
    if entries:
        tables["average"] = (header, rows)
    return tables


def transfer_table(summary, sources, targets):
    """The cross-dataset / DG table: a row per method, columns the source(s), each target and
    the targets' average (mean +- std over seeds; "-" where a method has no value)."""
    value = {}
    for s in summary:
        value.setdefault((method_label(s), s["dataset"]), s)
    datasets = [*sources, *targets]
    rows, plotted = [], {}
    for label in dict.fromkeys(method_label(s) for s in summary):
        cells = [value.get((label, d)) for d in datasets]
        means = [c["top1_mean"] for c, d in zip(cells, datasets) if c and d in targets]
        average = float(np.mean(means)) if len(means) == len(targets) else None
        rows.append([label, *(f"{c['top1_mean']:.2f} +- {c['top1_std']:.2f}" if c else "-"
                              for c in cells), "-" if average is None else f"{average:.2f}"])
        plotted[label] = [c["top1_mean"] if c else None for c in cells] + [average]
    return ["method", *datasets, "target average"], rows, plotted
