"""configs/methods.py: every method in one demo process, each row with its cost columns; QwT +
P4Q trains and exports on the compensated model; QAT is reached through `jobs.MODES`; the
methods table, its plot and the sweep's presets."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import costs
from p4q_jax import data
from p4q_jax import jobs
from p4q_jax import tables
from p4q_jax import train
from p4q_jax.clip import storage
from p4q_jax.configs import methods
from p4q_jax.p4q import classifier

import main_runner

sys.path.insert(0, str(main_runner.REPO / "experiments"))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_N_CTX = 4
_SMALL = {"data.name": "synthetic", "data.synthetic_examples": 80, "quant.calib_batches": 2,
          "quant.calib_batch_size": 16, "eval.batch_size": 40, "eval.text_batch_size": 64,
          "train.batch_size": 16, "train.num_steps": 3, "train.log_every": 1,
          "p4q.n_ctx": _N_CTX, "p4q.adapter_calib_batches": 1, "demo.qat": False}


def _config(checkpoint, **changes):
    config = methods.get_config()
    config.model.checkpoint = str(checkpoint)
    for dotted, value in {**_SMALL, **changes}.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


def _image_features(model, params, qstate, images):
    return np.asarray(clip.encode.apply(model, qstate.quantized_params(params), images,
                                        method=model.encode_image, qstate=qstate))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """The methods run (without QAT) on the random tiny CLIP and 80 synthetic images, in this
    process, with the QState each training received and the QwT solve's QState recorded."""
    workdir = tmp_path_factory.mktemp("methods")
    trained_on, solved = {}, {}
    real_train, real_qwt = train.train, jobs._qwt  # pylint: disable=protected-access

    def train_spy(config, *, qstate, **kwargs):
        trained_on[config.p4q.method] = qstate
        return real_train(config, qstate=qstate, **kwargs)

    def qwt_spy(job, qstate, ptq_row):
        solved["ptq"], (solved["qwt"], row) = qstate, real_qwt(job, qstate, ptq_row)
        return solved["qwt"], row

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train", train_spy)
        patch.setattr(jobs, "_qwt", qwt_spy)
        out = jobs.run(_config(tiny_checkpoint), workdir)
    return {"out": out, "workdir": workdir, "trained_on": trained_on, "solved": solved}


def test_every_row_kind_carries_the_cost_columns(run, tiny_checkpoint):
    rows = run["out"]["rows"]
    assert [r["method"] for r in rows] == [m for m in methods.METHODS if m != "qat"]
    row = {r["method"]: r for r in rows}
    for r in rows:
        assert set(costs.FIELDS) <= set(r), r["method"]
        assert isinstance(r["trainable_params"], int) and isinstance(r["bytes"], int)
        assert r["calibration_seconds"] >= 0 and r["training_seconds"] >= 0
        assert r["wall_seconds"] == pytest.approx(
            r["calibration_seconds"] + r["training_seconds"], abs=0.011)
        assert 0.05 < r["peak_rss_gb"] < 256, r["method"]
    # Trained by gradient: the 4 x 64 context; P4Q adds the adapter (64 -> 64 -> 64, with
    # biases: the demo's bottleneck is widened to the features). QwT's W, b per block of both
    # 2-block, 64-wide towers are solved, not trained.
    context, adapter, compensation = _N_CTX * 64, 2 * (64 * 64 + 64), 4 * (64 * 64 + 64)
    assert [row[m]["trainable_params"] for m in ("fp_zeroshot", "ptq", "qwt")] == [0, 0, 0]
    assert row["coop_fp"]["trainable_params"] == context
    assert row["p4q"]["trainable_params"] == row["qwt_p4q"]["trainable_params"] == context + adapter
    assert [r["compensation_params"] for r in rows] == [0, 0, 0, 0, compensation, compensation]
    # Calibration: measured once for the bit setting; QwT adds its solve; each trained row
    # carries the calibration of the model it trained on.
    assert row["ptq"]["calibration_seconds"] > 0 and row["coop_fp"]["calibration_seconds"] == 0
    assert row["qwt"]["calibration_seconds"] == pytest.approx(
        row["ptq"]["calibration_seconds"] + row["qwt"]["compensation_seconds"], abs=0.011)
    assert row["p4q"]["calibration_seconds"] == row["ptq"]["calibration_seconds"]
    assert row["qwt_p4q"]["calibration_seconds"] == row["qwt"]["calibration_seconds"]
    assert [r["training_seconds"] > 0 for r in rows] == [False, True, False, True, False, True]
    # One process: the peak is a running maximum, so it never falls from row to row.
    peaks = [r["peak_rss_gb"] for r in rows]
    assert peaks == sorted(peaks)
    # Bytes on disk: the checkpoint; the towers (QwT's with its float32 W, b); the exports.
    workdir = run["workdir"]
    assert row["fp_zeroshot"]["bytes"] == storage.bytes_on_disk(tiny_checkpoint)
    assert row["p4q"]["bytes"] == storage.bytes_on_disk(workdir / "w4a4attn8" / "export")
    assert row["qwt_p4q"]["bytes"] == storage.bytes_on_disk(
        workdir / "w4a4attn8_qwt_p4q" / "export")
    # QwT's towers hold its float32 W, b more: the export's compensation/ (which Orbax
    # compresses: 0.88x and 0.998x of the raw bytes seen in two runs).
    qwt_towers = workdir / "w4a4attn8_qwt_p4q" / "export" / "towers"
    assert row["qwt"]["bytes"] == storage.bytes_on_disk(qwt_towers)
    assert row["ptq"]["bytes"] == storage.bytes_on_disk(workdir / "w4a4attn8" / "export" /
                                                        "towers")
    extra = storage.bytes_on_disk(qwt_towers / "compensation")
    assert 0.5 * 4 * compensation <= extra <= 1.2 * 4 * compensation
    assert row["p4q"]["bytes"] > row["ptq"]["bytes"]
    saved = json.loads((workdir / "results.json").read_text())["rows"]
    assert [{f: r[f] for f in costs.FIELDS} for r in saved] == [
        {f: r[f] for f in costs.FIELDS} for r in rows]


def test_qwt_p4q_trains_on_the_compensated_model(run, tiny_checkpoint):
    plain, compensated = run["trained_on"]["p4q"], run["trained_on"]["qwt_p4q"]
    assert not plain.compensation and sorted(compensated.compensation) == sorted(
        run["solved"]["qwt"].compensation)
    assert run["trained_on"]["coop_fp"] is None
    model, params = clip.load(tiny_checkpoint)
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), jnp.float32)
    qwt_features = _image_features(model, params, run["solved"]["qwt"], images)
    ptq_features = _image_features(model, params, run["solved"]["ptq"], images)
    # The towers QwT + P4Q trains on are the compensated PTQ model's; plain P4Q's are not.
    np.testing.assert_array_equal(_image_features(model, params, compensated, images),
                                  qwt_features)
    np.testing.assert_array_equal(_image_features(model, params, plain, images), ptq_features)
    assert np.abs(qwt_features - ptq_features).max() > 1e-3


def test_qwt_p4q_export_reloads_with_the_compensation(run, tiny_checkpoint):
    model, params, qstate, trained = classifier.load(
        run["workdir"] / "w4a4attn8_qwt_p4q" / "export")
    solved = run["solved"]["qwt"]
    assert sorted(qstate.compensation) == sorted(solved.compensation)
    for block, c in solved.compensation.items():
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(qstate.compensation[block][name]),
                                          np.asarray(c[name]))
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), jnp.float32)
    variables = trained.variables(params, qstate)
    without = trained.variables(params, qstate.replace(compensation={}))
    assert np.abs(np.asarray(trained.image_features(model, variables, images))
                  - np.asarray(trained.image_features(model, without, images))).max() > 1e-3
    fp_model, fp_params = clip.load(tiny_checkpoint)
    np.testing.assert_allclose(
        np.asarray(clip.encode.apply(model, params, images, method=model.encode_image,
                                     qstate=qstate)),
        _image_features(fp_model, fp_params, solved, images), atol=1e-5)


def test_the_demo_runs_qat_through_the_qat_job(tmp_path, tiny_checkpoint, monkeypatch):
    config = _config(tiny_checkpoint, **{"demo.qat": True})
    calls = []

    def fake_job(method):
        def job(config, workdir, *, shared=None):
            calls.append((method, config.mode, config.p4q.method, config.quant.config,
                          workdir.name, type(shared)))
            fp = {"method": "fp_zeroshot", "top1": 10.0, "top5": 50.0, **costs.fields()}
            rows = [fp] if config.p4q.method == "coop_fp" else [
                fp, {"method": "ptq", "qconfig": "w4a4attn8", "top1": 20.0, "top5": 60.0,
                     **costs.fields(calibration_seconds=1.0)}]
            rows.append({"method": config.p4q.method, "qconfig": rows[-1].get("qconfig"),
                         "top1": 30.0 + len(calls), "top5": 70.0,
                         **costs.fields(trainable=7, training_seconds=2.0)})
            return {"rows": rows, "smoke_run": False, "checkpoint": None, "model": {},
                    "dataset": "synthetic", "num_classes": 10, "num_templates": 1}
        return job

    monkeypatch.setattr(jobs, "p4q", fake_job("p4q"))
    monkeypatch.setattr(jobs, "qat", fake_job("qat"))
    out = jobs.demo(config, tmp_path / "qat")
    assert [c[:4] for c in calls] == [("p4q", "demo", "coop_fp", "w4a4attn8"),
                                      ("p4q", "demo", "p4q", "w4a4attn8"),
                                      ("p4q", "demo", "qwt_p4q", "w4a4attn8"),
                                      ("qat", "qat", "qat", "w4a4attn8")]
    assert calls[-1][4:] == ("w4a4attn8_qat", dict)
    assert [r["method"] for r in out["rows"]] == ["fp_zeroshot", "coop_fp", "ptq", "p4q",
                                                 "qwt_p4q", "qat"]
    table = (tmp_path / "qat" / "results.md").read_text()
    assert "| w4a4attn8 | QAT | 34.00 | 70.00 | 7 | 2.0 |" in table


def _record(row, qconfig, seed, top1, calibration, training, *, trainable=0, size=1000):
    return {"dataset": "shapes_warm", "shots": None, "qconfig": qconfig, "row": row,
            "seed": seed, "top1": top1, "top5": 90.0, "trainable_params": trainable,
            "compensation_params": 0, "calibration_seconds": calibration,
            "training_seconds": training, "wall_seconds": calibration + training,
            "peak_rss_gb": 1.5, "bytes": size, "workdir": f"{row}/seed{seed}"}


def test_methods_table_and_plot_from_results(tmp_path):
    records = [_record("ptq", "w4a4attn8", s, t, 1.0, 0.0)
               for s, t in enumerate((40.0, 42.0, 44.0))]
    records += [_record("p4q", "w4a4attn8", s, t, 1.0, w, trainable=8576)
                for s, (t, w) in enumerate(((50.0, 9.0), (53.0, 11.0), (56.0, 16.0)))]
    records.append(_record("fp_zeroshot", "fp32", 0, 30.0, 0.0, 0.0, size=None))
    header, rows = tables.methods_table(tables.summarize(records))
    assert header[3:9] == ["top-1 (%)", "trainable params", "QwT params", "calibration (s)",
                           "training (s)", "calibration + training (s)"]
    # PTQ: top-1 40, 42, 44 -> 42 +- sqrt(8/3); P4Q: 50, 53, 56 -> 53 +- sqrt(6), seconds
    # 1 + (9, 11, 16) -> training 12, calibration + training 13 +- sqrt(26/3).
    assert rows == [
        ["shapes_warm", "fp32", "FP zero-shot", "30.00 +- 0.00", "0", "0", "0.0", "0.0",
         "0.0 +- 0.0", "1.50", "-", 1],
        ["shapes_warm", "w4a4attn8", "PTQ", "42.00 +- 1.63", "0", "0", "1.0", "0.0",
         "1.0 +- 0.0", "1.50", "1,000", 3],
        ["shapes_warm", "w4a4attn8", "P4Q", "53.00 +- 2.45", "8,576", "0", "1.0", "12.0",
         "13.0 +- 2.9", "1.50", "1,000", 3]]
    text = sweep.report(records, tables.summarize(records), tmp_path)
    assert "## Methods and their cost" in text
    assert "| shapes_warm | w4a4attn8 | P4Q | 53.00 +- 2.45 | 8,576 |" in text
    assert (tmp_path / "top1_vs_cost.png").read_bytes().startswith(b"\x89PNG")


def test_presets_take_their_lists_from_configs_and_data_coop():
    coop = data.coop
    trained = [f"coop/{n}" for n in coop.NAMES if n not in coop.TEST_ONLY]
    assert len(trained) == 11
    for name in ("coop_fewshot", "base_to_new"):
        assert sweep.PRESETS[name]["datasets"] == trained
    assert sweep.PRESETS["domain_generalization"]["transfer_to"] == [
        f"coop/{n}" for n in coop.TEST_ONLY]
    assert sweep.PRESETS["cross_dataset"]["transfer_to"] == trained[1:]  # all but ImageNet
    assert sweep.PRESETS["methods"]["methods"] == ["configs/methods.py:w4a4attn8",
                                                   "configs/methods.py:w8a8"]
    points = sweep.grid(sweep.PRESETS["methods"]["methods"], ["coop/dtd"], [],
                        sweep.PRESETS["methods"]["seeds"])
    assert len(points) == 6
    command = points[-1].command("/out", ["data.root=/data"])
    assert command[2:] == [f"--config={main_runner.REPO}/configs/methods.py:w8a8",
                           "--workdir=/out/methods_w8a8/coop/dtd/seed2",
                           "--config.data.name=coop/dtd", "--config.seed=2",
                           "--config.data.root=/data"]
