"""experiments/sweep.py: the grid, the summary over seeds, and a small real sweep of main.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import main_runner

sys.path.insert(0, str(main_runner.REPO / "experiments"))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


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
    summary = {(s["qconfig"], s["row"]): s for s in sweep.summarize(records)}
    p4q = summary[("w8a8", "p4q")]
    assert p4q["n"] == 3 and p4q["top1_mean"] == pytest.approx(30.0)
    assert p4q["top1_std"] == pytest.approx(np.sqrt((400 + 100 + 900) / 3))
    fp = summary[("fp32", "fp_zeroshot")]
    assert fp["n"] == 2 and fp["top1_mean"] == pytest.approx(60.0)


def _sweep(out, *args):
    # One device per run: the sweep, not the sharding, is under test here.
    return subprocess.run(
        [sys.executable, str(main_runner.REPO / "experiments" / "sweep.py"), f"--out={out}",
         "--methods=zeroshot", "--datasets=synthetic", "--set=model.name=tiny",
         "--set=eval.batch_size=16", "--set=eval.text_batch_size=16",
         "--set=data.synthetic_examples=32", *args],
        cwd=main_runner.REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": ""})


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
    assert "| synthetic | fp32 | fp_zeroshot |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "top1_synthetic.png").read_bytes().startswith(b"\x89PNG")
    # Again: the done point is skipped; a bad point fails alone, and says so.
    again = _sweep(tmp_path, "--seeds=0", "--datasets=synthetic,no_such_dataset")
    assert again.returncode == 1
    assert again.stderr.count("done before, skipped") == 1
    assert "1 of 2 runs failed" in again.stderr
    assert "data.name='no_such_dataset': expected one of" in (
        tmp_path / "zeroshot/no_such_dataset/seed0/main.log").read_text()
