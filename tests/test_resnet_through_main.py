"""A P4Q run of main.py's job (in this process) with a ResNet CLIP (random `tiny-rn` weights, BatchNorm folded), then
`--mode=eval` of its export: the whole pipeline, unchanged, on the other image tower."""

import json

import main_runner


def test_p4q_then_eval_with_a_resnet_image_tower(tmp_path, tiny_rn_checkpoint):
    workdir = tmp_path / "run"
    main_runner.run_job([
        "--config=configs/p4q.py", "--config.data.name=cifar10",
        f"--config.model.checkpoint={tiny_rn_checkpoint}", "--config.quant.fold_batchnorm=True",
        "--config.quant.config=w8a8", "--config.quant.calib_batches=1", "--config.quant.calib_batch_size=16",
        "--config.eval.batch_size=24", "--config.eval.text_batch_size=64",
        "--config.train.batch_size=16", "--config.train.num_steps=4", "--config.p4q.n_ctx=4",
        "--config.p4q.adapter_calib_batches=1", f"--workdir={workdir}"])
    results = json.loads((workdir / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["fp_zeroshot", "ptq", "p4q"]
    assert all(row["count"] == 50 for row in results["rows"])
    meta = json.loads((workdir / "export" / "towers" / "p4q_quant.json").read_text())
    assert meta["clip_config"]["vision"]["layers"] == [1, 2, 1, 1]
    assert "visual/layer2_0/downsample_0" in meta["kernels"]
    main_runner.run_job([
        "--config=configs/p4q.py", "--mode=eval", "--config.data.name=cifar10",
        f"--config.model.checkpoint={tiny_rn_checkpoint}", "--config.quant.fold_batchnorm=True",
        "--config.eval.batch_size=24", f"--workdir={workdir}"])
    (row,) = json.loads((workdir / "eval_results.json").read_text())["rows"]
    assert (row["top1"], row["top5"]) == (results["rows"][2]["top1"], results["rows"][2]["top5"])
