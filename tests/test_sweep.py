"""experiments/sweep.py: the grid, the summary over seeds, and a small real sweep of main.py's
jobs (the sweep and its jobs in this process: `main_runner.run_sweep`)."""
import json

import numpy as np
import pytest

import main_runner
from p4q_jax import tables
import sweep  # experiments/sweep.py (main_runner puts experiments/ on sys.path)


def test_grid_and_workdirs():
    points = sweep.grid(["ptq", "p4q"], ["cifar10"], ["w8a8", "w4a4attn8"], ["1", "2"])
    assert len(points) == 8
    assert str(points[0].workdir("out")) == "out/ptq/cifar10/w8a8/seed1"
    command = points[-1].command("out", ["model.checkpoint=x.pt"])
    assert command[2].endswith("configs/p4q.py")
    assert command[-4:] == ["--config.data.name=cifar10", "--config.quant.config=w4a4attn8",
                            "--config.seed=2", "--config.model.checkpoint=x.pt"]
    # An empty axis keeps the config's own value and adds no directory level.
    (point,) = sweep.grid(["default"], [], [], [])
    assert str(point.workdir("out")) == "out/default" and len(point.command("out")) == 4


def test_summary_is_mean_and_std_over_seeds_counting_shared_rows_once():
    records = [
        {"dataset": "d", "qconfig": "w8a8", "row": "p4q", "seed": s, "top1": t, "top5": t + 1}
        for s, t in ((0, 10.0), (1, 20.0), (2, 60.0))]
    # The FP row of two settings of one seed (same value) counts once.
    records += [{"dataset": "d", "qconfig": "fp32", "row": "fp_zeroshot", "seed": s,
                 "top1": t, "top5": 99.0} for s, t in ((0, 50.0), (0, 50.0), (1, 70.0))]
    summary = {(s["qconfig"], s["row"]): s for s in tables.summarize(records)}
    p4q = summary[("w8a8", "p4q")]
    assert p4q["n"] == 3 and p4q["top1_mean"] == pytest.approx(30.0)
    assert p4q["top1_std"] == pytest.approx(np.sqrt((400 + 100 + 900) / 3))
    fp = summary[("fp32", "fp_zeroshot")]
    assert fp["n"] == 2 and fp["top1_mean"] == pytest.approx(60.0)


def _sweep(out, *args):
    return main_runner.run_sweep(
        [f"--out={out}", "--methods=zeroshot", "--datasets=synthetic", "--set=model.name=tiny",
         "--set=eval.batch_size=16", "--set=eval.text_batch_size=16",
         "--set=data.synthetic_examples=32", *args])


def test_sweep_runs_main_collects_and_resumes(tmp_path):
    done = _sweep(tmp_path, "--seeds=0,1")
    assert done.returncode == 0, done.stderr[-3000:]
    collected = json.loads((tmp_path / "results.json").read_text())
    runs = [json.loads((tmp_path / f"zeroshot/synthetic/seed{s}/results.json").read_text())
            for s in (0, 1)]
    assert [r["top1"] for r in collected["runs"]] == [r["rows"][0]["top1"] for r in runs]
    (summary,) = collected["summary"]
    assert summary["n"] == 2 and summary["top1_mean"] == pytest.approx(
        np.mean([r["rows"][0]["top1"] for r in runs]))
    assert "| synthetic | - | fp32 | fp_zeroshot |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "top1_synthetic.png").read_bytes().startswith(b"\x89PNG")
    # Again: the done point is skipped; a bad point fails alone, and says so.
    again = _sweep(tmp_path, "--seeds=0", "--datasets=synthetic,no_such_dataset")
    assert again.returncode == 1
    assert again.stderr.count("done before, skipped") == 1
    assert "1 of 2 runs failed" in again.stderr
    assert "data.name='no_such_dataset': expected one of" in (
        tmp_path / "zeroshot/no_such_dataset/seed0/main.log").read_text()


def _preset(out, *args, preset="coop_fewshot"):
    return main_runner.run_sweep([f"--out={out}", f"--preset={preset}", *args])


def test_coop_preset_is_coops_grid(tmp_path):
    done = _preset(tmp_path, "--dry_run", "--set=data.root=/data")
    assert done.returncode == 0, done.stderr[-3000:]
    commands = done.stdout.splitlines()
    assert len(commands) == 3 * 11 * 5 * 3  # variants x datasets x shots x seeds
    (command,) = [c for c in commands if f"--workdir={tmp_path}/coop_fewshot_p4q_w8a8/coop/dtd/"
                  "4shots/seed2 " in c]
    assert command.endswith("configs/coop_fewshot.py:p4q_w8a8 "
                            f"--workdir={tmp_path}/coop_fewshot_p4q_w8a8/coop/dtd/4shots/seed2 "
                            "--config.data.name=coop/dtd --config.data.num_shots=4 "
                            "--config.seed=2 --config.data.shot_seed=2 --config.data.root=/data")


def _fake_run(out, variant, dataset, shots, seed, rows):
    workdir = out / f"coop_fewshot_{variant}" / dataset / f"{shots}shots" / f"seed{seed}"
    workdir.mkdir(parents=True)
    (workdir / "results.json").write_text(json.dumps({"dataset": dataset, "rows": [
        {"method": m, "qconfig": q, "top1": t, "top5": 100.0} for m, q, t in rows]}))


def test_coop_tables_and_figure_from_results(tmp_path):
    # Two datasets, shots 1 and 2, seeds 1 and 2; CoOp-FP and P4Q w8a8 runs.
    for shots in (1, 2):
        for seed in (1, 2):
            for dataset, base in (("coop/dtd", 40.0), ("coop/eurosat", 60.0)):
                coop = base + 10 * shots + seed  # seeds 1, 2 -> mean +0.5, std 0.5
                _fake_run(tmp_path, "coop_fp", dataset, shots, seed,
                          [("fp_zeroshot", None, base), ("coop_fp", None, coop)])
                _fake_run(tmp_path, "p4q_w8a8", dataset, shots, seed,
                          [("fp_zeroshot", None, base), ("ptq", "w8a8", base - 5),
                           ("p4q_w8a8", "w8a8", coop - 2 * seed)])
    done = _preset(tmp_path, "--collect_only", "--datasets=coop/dtd,coop/eurosat",
                   "--shots=1,2", "--seeds=1,2",
                   "--methods=configs/coop_fewshot.py:coop_fp,configs/coop_fewshot.py:p4q_w8a8")
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    assert "## 2 shots: top-1 (%), mean +- std over seeds" in text
    table = text[text.index("## 2 shots"):].split("\n\n")[1]
    assert "| method | coop/dtd | coop/eurosat | average |" in table
    assert "| FP zero-shot | 40.00 +- 0.00 | 60.00 +- 0.00 | 50.00 |" in table
    assert "| CoOp-FP | 61.50 +- 0.50 | 81.50 +- 0.50 | 71.50 |" in table
    # P4Q: coop - 2 * seed -> seeds give 59, 58 (dtd): mean 58.5, std 0.5.
    assert "| p4q_w8a8 | 58.50 +- 0.50 | 78.50 +- 0.50 | 68.50 |" in table
    assert "| PTQ w8a8 | 35.00 +- 0.00 | 55.00 +- 0.00 | 45.00 |" in table
    assert (tmp_path / "top1_vs_shots.png").read_bytes().startswith(b"\x89PNG")


def test_base_to_new_tables_from_results(tmp_path):
    def run(variant, dataset, seed, rows):
        workdir = (tmp_path / f"coop_fewshot_{variant}" / dataset / "base" / "16shots"
                   / f"seed{seed}")
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text(json.dumps({"dataset": dataset, "rows": [
            {"method": m, "qconfig": q, "top1": b, "top5": 100.0, "new": {"top1": n},
             "hm": 2 * b * n / (b + n)} for m, q, b, n in rows]}))

    for seed in (1, 2):
        for dataset, base in (("coop/dtd", 60.0), ("coop/eurosat", 80.0)):
            run("coop_fp", dataset, seed, [("fp_zeroshot", None, base, base - 10),
                                           ("coop_fp", None, base + 2 * seed, base - 20)])
    done = _preset(tmp_path, "--collect_only", "--datasets=coop/dtd,coop/eurosat",
                   "--seeds=1,2", "--methods=configs/coop_fewshot.py:coop_fp",
                   preset="base_to_new")
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    dtd = text[text.index("## Base-to-new, coop/dtd"):].split("\n\n")[1]
    assert "| method | base | new | H |" in dtd
    assert "| FP zero-shot | 60.00 +- 0.00 | 50.00 +- 0.00 | 54.55 +- 0.00 |" in dtd
    # CoOp: base 62 and 64 (mean 63, std 1), new 40; H per seed 48.63 and 49.23.
    assert "| CoOp-FP | 63.00 +- 1.00 | 40.00 +- 0.00 | 48.93 +- 0.30 |" in dtd
    average = text[text.index("## Base-to-new, average"):].split("\n\n")[1]
    # Averages over the two datasets: base (63 + 83) / 2, new (40 + 60) / 2, H of the two.
    assert "| CoOp-FP | 73.00 | 50.00 | 59.35 |" in average
    assert (tmp_path / "base_to_new.png").read_bytes().startswith(b"\x89PNG")


def test_base_to_new_preset_trains_on_the_base_half(tmp_path):
    done = _preset(tmp_path, "--dry_run", preset="base_to_new")
    assert done.returncode == 0, done.stderr[-3000:]
    commands = done.stdout.splitlines()
    assert len(commands) == 3 * 11 * 3  # variants x datasets x seeds, 16 shots
    assert all(" --config.data.num_shots=16 " in c and " --config.data.subsample=base " in c
               for c in commands)
    # Its runs have their own directories: a few-shot sweep in the same OUT cannot reuse them.
    assert all("/base/16shots/seed" in c for c in commands)


def test_cross_dataset_preset_evaluates_each_export_on_every_target(tmp_path):
    done = _preset(tmp_path, "--dry_run", "--set=data.root=/data", preset="cross_dataset")
    assert done.returncode == 0, done.stderr[-3000:]
    commands = done.stdout.splitlines()
    assert len(commands) == 9 + 9 * 10 + 10  # trainings, their transfers, zero-shot targets
    source = f"{tmp_path}/coop_fewshot_p4q_w8a8/coop/imagenet/16shots/seed3"
    (transfer,) = [c for c in commands if f"--workdir={source}/transfer/coop_ucf101 " in c]
    assert " --mode=eval " in transfer and f"--config.p4q.export_dir={source}/export " in transfer
    assert " --config.data.name=coop/ucf101 " in transfer
    # Zero-shot CLIP on each target with the source runs' prompts (their config, its templates).
    zeroshots = [c for c in commands if " --mode=zeroshot" in c]
    assert len(zeroshots) == 10 and all(
        "configs/coop_fewshot.py:coop_fp --workdir=" in c for c in zeroshots)
    assert f"--workdir={tmp_path}/zeroshot/coop/ucf101 --mode=zeroshot " in zeroshots[-1]


def test_transfer_table_from_results(tmp_path):
    def write(workdir, name, dataset, rows):
        workdir.mkdir(parents=True)
        (workdir / name).write_text(json.dumps({"dataset": dataset, "rows": [
            {"method": m, "qconfig": q, "top1": t, "top5": 100.0} for m, q, t in rows]}))

    targets = ["coop/imagenetv2", "coop/imagenet_sketch", "coop/imagenet_a", "coop/imagenet_r"]
    for seed in (1, 2):
        run = tmp_path / "coop_fewshot_p4q_w8a8/coop/imagenet/16shots" / f"seed{seed}"
        write(run, "results.json", "coop/imagenet", [
            ("fp_zeroshot", None, 60.0), ("ptq", "w8a8", 58.0), ("p4q_w8a8", "w8a8", 62.0 + seed)])
        for k, target in enumerate(targets):
            write(run / "transfer" / target.replace("/", "_"), "eval_results.json", target,
                  [("p4q_w8a8", "w8a8", 40.0 + 10 * k + seed)])
    for k, target in enumerate(targets):
        write(tmp_path / "zeroshot" / target, "results.json", target,
              [("fp_zeroshot", None, 30.0 + 10 * k)])
    done = _preset(tmp_path, "--collect_only", "--seeds=1,2",
                   "--methods=configs/coop_fewshot.py:p4q_w8a8", preset="domain_generalization")
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    table = text[text.index("## Transfer from coop/imagenet"):].split("\n\n")[1]
    assert ("| method | coop/imagenet | coop/imagenetv2 | coop/imagenet_sketch | "
            "coop/imagenet_a | coop/imagenet_r | target average |") in table
    assert ("| FP zero-shot | 60.00 +- 0.00 | 30.00 +- 0.00 | 40.00 +- 0.00 | 50.00 +- 0.00 | "
            "60.00 +- 0.00 | 45.00 |") in table
    assert ("| p4q_w8a8 | 63.50 +- 0.50 | 41.50 +- 0.50 | 51.50 +- 0.50 | 61.50 +- 0.50 | "
            "71.50 +- 0.50 | 56.50 |") in table
    assert "| PTQ w8a8 | 58.00 +- 0.00 | - | - | - | - | - |" in table
    assert (tmp_path / "transfer.png").read_bytes().startswith(b"\x89PNG")


def _recipe(prompts, adapter, distillation, teacher=None):
    return {"prompts": prompts, "adapter": adapter, "distillation": distillation,
            "teacher": teacher and {"kind": teacher, "method": "fp_p4q", "train_top1": 70.0,
                                    "test_top1": 60.0}}


def test_demo_preset_tables_and_claims():
    """The demo preset's grid, its paper-layout tables and the claims with their margins,
    from fabricated results whose means and spreads are known."""
    assert sweep.PRESETS["demo"]["methods"] == ["configs/default.py:grid",
                                                "configs/default.py:shapes_control"]
    zeroshot = "zeroshot"
    rows = [(("fp32", "fp_zeroshot", None), (50.0, 50.0)),
            (("fp32", "coop_fp", _recipe("learned", False, "none")), (60.0, 62.0)),
            (("w8a8", "ptq", None), (49.0, 49.0)),
            (("w8a8", "p4q", _recipe("learned", True, "official", zeroshot)), (61.0, 61.2)),
            (("w4a4attn8", "ptq", None), (44.0, 46.0)),
            (("w4a4attn8", "p4q", _recipe("learned", True, "official", zeroshot)), (63.0, 65.0)),
            (("w4a4attn8", "p4q_prompts_only",
              _recipe("learned", False, "official", zeroshot)), (40.0, 40.0)),
            (("w4a4attn8", "p4q_adapter_only",
              _recipe("fixed ('a photo of a')", True, "official", zeroshot)), (64.0, 66.0)),
            (("w4a4attn8", "p4q_no_distillation", _recipe("learned", True, "none")),
             (61.0, 61.0))]
    records = [{"dataset": "shapes_warm", "shots": None, "qconfig": q, "row": r, "seed": seed,
                "top1": t, "top5": 99.0, "recipe": recipe}
               for (q, r, recipe), values in rows for seed, t in enumerate(values)]
    demo = tables.demo_tables(tables.summarize(records))
    (header, main), (grid_header, grid) = demo.values()
    assert [row[1] for row in main] == ["FP zero-shot", "CoOp-FP", "PTQ", "P4Q", "PTQ", "P4Q"]
    assert main[1][2:] == ["61.00 +- 1.00", "60.00 / 62.00"] and header[2] == "top-1 (%)"
    assert grid_header[:4] == ["prompts", "adapter", "distillation",
                               "teacher (top-1 train / test)"]
    assert grid == [
        ["-", "-", "-", "-", "PTQ", "45.00 +- 1.00", "44.00 / 46.00"],
        ["fixed", "8-bit", "official", "FP zero-shot (70.0 / 60.0)", "P4Q: adapter only",
         "65.00 +- 1.00", "64.00 / 66.00"],
        ["learned", "-", "official", "FP zero-shot (70.0 / 60.0)", "P4Q: prompts only",
         "40.00 +- 0.00", "40.00 / 40.00"],
        ["learned", "8-bit", "none", "-", "P4Q: no distillation", "61.00 +- 0.00",
         "61.00 / 61.00"],
        ["learned", "8-bit", "official", "FP zero-shot (70.0 / 60.0)", "P4Q", "64.00 +- 1.00",
         "63.00 / 65.00"]]
    claims_header, claims = tables.demo_claims(tables.summarize(records))
    assert claims_header[-2:] == ["margin (std)", "on the means"]
    by_claim = {row[0]: row for row in claims}
    # P4Q 64 +- 1 vs adapter only 65 +- 1: -1 point over sqrt(1 + 1) = -0.7 std.
    assert by_claim["learned prompts add to the adapter"][2:] == [
        "64.00 +- 1.00", "65.00 +- 1.00", "-1.00", "-0.7", "does not hold (within 1 std)"]
    # vs prompts only 40 +- 0: +24 over 1.
    assert by_claim["the adapter adds to learned prompts"][4:] == ["+24.00", "+24.0", "holds"]
    assert by_claim["distillation (official) helps"][4:] == ["+3.00", "+3.0", "holds"]
    assert by_claim["4-bit P4Q beats FP zero-shot"][1:] == [
        "shapes_warm w4a4attn8", "64.00 +- 1.00", "50.00 +- 0.00", "+14.00", "+14.0", "holds"]
    # 8-bit P4Q 61.1 +- 0.1 vs CoOp-FP 61 +- 1: +0.1 over sqrt(0.01 + 1).
    assert by_claim["8-bit P4Q beats CoOp-FP"][4:] == ["+0.10", "+0.1", "holds (within 1 std)"]
    assert "distillation (KL, trained FP teacher) helps" not in by_claim  # no such rows
    # Without ablation rows (e.g. a plain p4q sweep) neither table nor claims appear.
    plain = [r for r in records if not r["row"].startswith("p4q_")]
    assert not tables.demo_tables(tables.summarize(plain))
    assert not tables.demo_claims(tables.summarize(plain))[1]


def _fake_main(calls):
    """A stand-in for main.py's process: writes a results.json whose top-1 counts the runs."""
    def call(command, **_):
        workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
        calls.append(command)
        results = {"dataset": "synthetic", "rows": [
            {"method": "fp_zeroshot", "qconfig": None, "top1": float(len(calls)), "top5": 0.0}]}
        (sweep.pathlib.Path(workdir) / "results.json").write_text(json.dumps(results))
        return 0
    return call


def test_a_point_whose_settings_changed_runs_again_keeping_the_old_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep.subprocess, "call", _fake_main(calls))
    (point,) = sweep.grid(["zeroshot"], ["synthetic"], [], [0])
    workdir = point.workdir(tmp_path)
    assert sweep.run_points([point], tmp_path, ["train.num_steps=5"]) == []
    assert sweep.run_points([point], tmp_path, ["train.num_steps=5"]) == []  # done: skipped
    assert len(calls) == 1
    sweep.run_points([point], tmp_path, ["train.num_steps=10"])  # more steps: runs again
    assert len(calls) == 2 and calls[-1][-1] == "--config.train.num_steps=10"
    (previous,) = (workdir / "previous").iterdir()
    assert json.loads((previous / "results.json").read_text())["rows"][0]["top1"] == 1.0
    assert json.loads((previous / sweep.SETTINGS).read_text())["set"] == ["train.num_steps=5"]
    (record,) = sweep.collect([point], tmp_path, ["train.num_steps=10"])
    assert record["top1"] == 2.0
    # Collecting for other settings leaves the point out rather than report its numbers.
    assert sweep.collect([point], tmp_path, ["train.num_steps=20"]) == []
    # Results whose settings were never recorded (an older sweep) are not trusted either.
    (workdir / sweep.SETTINGS).unlink()
    sweep.run_points([point], tmp_path, ["train.num_steps=10"])
    assert len(calls) == 3 and len(list((workdir / "previous").iterdir())) == 2


def test_seeds_shots_and_set_errors_name_the_flag_and_value():
    with pytest.raises(sweep.app.UsageError, match="--seeds: 'a' is not an integer"):
        sweep.integers("seeds", ["1", "a"])
    with pytest.raises(sweep.app.UsageError, match="--shots: 'abc' is not an integer"):
        sweep.integers("shots", ["abc"])
    assert sweep.integers("seeds", ["0", "12"]) == [0, 12]
    with pytest.raises(sweep.app.UsageError) as e:
        sweep.check_set(["zeroshot"], ["trian.num_steps=5"])
    assert "the zeroshot config has no field 'trian'" in str(e.value)
    assert "data, demo, distributed, eval, loss, mesh, mode, model, p4q, qat, quant" in str(
        e.value)
    with pytest.raises(sweep.app.UsageError) as e:
        sweep.check_set(["p4q"], ["eval.bsize=5"])
    assert "no field 'eval.bsize' (the fields of eval: batch_size, text_batch_size)" in str(
        e.value)
    sweep.check_set(["p4q", "zeroshot"], ["eval.batch_size=16", "model.checkpoint=x.pt"])


def test_relative_out_is_one_place_wherever_the_sweep_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = main_runner.run_sweep(["--out=rel", "--methods=zeroshot", "--seeds=0", "--dry_run"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f" --workdir={tmp_path}/rel/zeroshot/seed0 " in done.stdout
