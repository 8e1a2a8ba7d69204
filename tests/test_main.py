"""End-to-end runs of main.py's jobs (in this process: `main_runner.run_job`) on mock TFDS
data (no network, tiny models)."""

import json

import numpy as np
import tensorflow_datasets as tfds

from p4q_jax import clip
from p4q_jax import data

import main_runner

_run_job = main_runner.run_job


def _mock_test_split(config_module, dataset):
    """The images and labels that main.py evaluated on under the same mock data."""
    data_cfg = config_module.get_config().data
    data_cfg.name = dataset
    with tfds.testing.mock_data(num_examples=50):
        batches = list(data.as_numpy_batches(data.create_dataset(
            data_cfg, split="test", batch_size=50, image_size=32, train=False)))
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]))


# Cosine logits of the float32 sharded pipeline and of the float64 reference differ by
# ~1e-6; an image whose top two reference logits are closer than this may go either way.
_TIE = 1e-4


def _reference_zeroshot(checkpoint, dataset, images, labels):
    """Unsharded, unpadded zero-shot top-1 with the public API only, as the (lowest,
    highest) value float rounding allows: near-tied images counted wrong, then right."""
    model, params = clip.load(checkpoint)
    info = data.get_info(dataset)
    weights = []
    for prompts in data.prompts(info.class_names, info.templates):
        f = np.asarray(clip.encode_text(model, params, clip.tokenize(prompts)), np.float64)
        f /= np.linalg.norm(f, axis=-1, keepdims=True)
        weights.append(f.mean(0) / np.linalg.norm(f.mean(0)))
    img = np.asarray(clip.encode_image(model, params, images), np.float64)
    logits = img @ np.stack(weights).T
    top2 = np.sort(logits, axis=-1)[:, -2:]
    tied = top2[:, 1] - top2[:, 0] < _TIE
    correct = logits.argmax(-1) == labels
    assert tied.sum() <= 2, "too many near-ties for the test to say much"
    return 100.0 * np.mean(correct & ~tied), 100.0 * np.mean(correct | tied)


def test_zeroshot_cifar100_through_main(tmp_path, tiny_checkpoint):
    _run_job(["--config=configs/zeroshot.py", f"--config.model.checkpoint={tiny_checkpoint}",
               "--config.data.name=cifar100", "--config.eval.batch_size=24",
               "--config.eval.text_batch_size=64", f"--workdir={tmp_path}"])
    from p4q_jax.configs import zeroshot  # pylint: disable=g-import-not-at-top
    images, labels = _mock_test_split(zeroshot, "cifar100")
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert results["smoke_run"] is False and results["num_classes"] == 100
    assert row["count"] == 50  # two padded batches of 24 and one of 2 real examples
    low, high = _reference_zeroshot(tiny_checkpoint, "cifar100", images, labels)
    assert low - 1e-6 <= row["top1"] <= high + 1e-6
    assert 0 <= row["top1"] <= row["top5"] <= 100


def test_no_checkpoint_is_an_offline_smoke_run(tmp_path):
    log = _run_job(["--config=configs/base.py", f"--workdir={tmp_path}"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["smoke_run"] is True
    from p4q_jax.configs import base  # pylint: disable=g-import-not-at-top
    assert results["rows"][0]["count"] == base.get_config().data.synthetic_examples
    assert "SMOKE RUN" in log


def test_ptq_cifar10_through_main(tmp_path, tiny_checkpoint):
    _run_job(["--config=configs/ptq.py", f"--config.model.checkpoint={tiny_checkpoint}",
               "--config.data.name=cifar10", "--config.eval.batch_size=24",
               "--config.eval.text_batch_size=64", "--config.quant.calib_batches=2",
               "--config.quant.calib_batch_size=16", "--config.quant.config=w6a6",
               "--config.quant.compensation=qwt", f"--workdir={tmp_path}"])
    from p4q_jax.configs import ptq  # pylint: disable=g-import-not-at-top
    images, labels = _mock_test_split(ptq, "cifar10")
    results = json.loads((tmp_path / "results.json").read_text())
    fp, q, qwt = results["rows"]
    assert (fp["method"], q["method"], q["qconfig"]) == ("fp_zeroshot", "ptq", "w6a6")
    assert (qwt["method"], qwt["qconfig"]) == ("qwt", "w6a6") and qwt["compensation_seconds"] > 0
    assert fp["count"] == q["count"] == qwt["count"] == 50
    assert 0 <= qwt["top1"] <= qwt["top5"] <= 100
    low, high = _reference_zeroshot(tiny_checkpoint, "cifar10", images, labels)
    assert low - 1e-6 <= fp["top1"] <= high + 1e-6
    assert 0 <= q["top1"] <= q["top5"] <= 100
    # The PTQ diagnostics: both towers' cosines to FP and the worst sites.
    report = q["diagnostics"]
    assert set(report["cosine_to_fp"]) == {"image", "text"}
    assert 0.5 < report["cosine_to_fp"]["image"]["mean"] <= 1.0 + 1e-6
    assert len(report["worst_sites"]) == 10 < report["num_sites"]
    assert {s["bits"] for s in report["worst_sites"]} == {6}
    assert all(s["sqnr_db"] > 0 for s in report["worst_sites"])


def test_classifier_builds_reuse_one_compiled_text_encoder():
    from p4q_jax import evaluate, parallel  # pylint: disable=g-import-not-at-top
    model, params = clip.init("tiny")
    mesh = parallel.make_mesh()
    variables = parallel.replicate({"params": params, "qstate": None}, mesh)
    prompts = [["a photo of a cat.", "a cat."], ["a photo of a dog.", "a dog."]]
    encoder = evaluate._text_encoder(model, mesh)  # noqa: SLF001
    first = evaluate.zeroshot_classifier(model, variables, prompts, mesh=mesh, batch_size=8)
    compiled = encoder._cache_size()  # noqa: SLF001  (earlier tests of this process count)
    second = evaluate.zeroshot_classifier(model, variables, prompts, mesh=mesh, batch_size=8)
    np.testing.assert_array_equal(first, second)
    assert evaluate._text_encoder(model, mesh) is encoder  # noqa: SLF001
    assert encoder._cache_size() == compiled >= 1  # noqa: SLF001  the second build compiles nothing
