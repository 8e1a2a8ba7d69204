"""PTQ diagnostics of `quant.calibrate`: per-site SQNR against numpy references, the
cosines, and the warning that names the sites where a collapsing model loses its signal."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import quant
from p4q_jax.quant import sites

TEXTS = ["a photo of a cat.", "a blurry photo of the big red truck on a road.", "a dog."]
MLP_INPUT = "transformer/resblocks_0/mlp/c_fc"


def _images(batches=2, batch=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, size, size, 3)).astype(np.float32) for _ in range(batches)]


def _site_input(model, params, qstate, x, method, name):
    """The tensor entering the Dense `name` in the quantized model (fake-quant arithmetic),
    recorded by an interceptor outside the one that quantizes it."""
    seen = {}

    def record(kind, site, a):
        if site == name and kind == "input":
            seen[name] = np.asarray(a, np.float64)
        return a

    with sites.intercept(record):
        clip.encode.apply(model, params, x, method=method, qstate=qstate.replace(codes=False))
    return seen[name]


def _sqnr_db(x, xq, weight=1.0):
    return 10 * np.log10(np.sum(weight * x**2) / np.sum(weight * (x - xq) ** 2))


def _uint8(x, qparams):
    """The asymmetric uint8 quantizer in numpy, on the calibrated scale and zero point."""
    s = np.asarray(qparams.scale, np.float64)
    zp = np.asarray(qparams.zero_point, np.float64)
    return (np.clip(np.round(x / s) + zp, 0, 255) - zp) * s


class _Records(logging.Handler):
    """Keeps the log records (INFO and above) emitted while it is attached."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def tiny_calibrated():
    """(model, params, images, QState, report, the log records of the calibration): one
    calibration of a healthy model serves the report tests and the log test."""
    model, params = clip.init("tiny", seed=0)
    images = _images(size=model.config.vision.image_size)
    root, log = logging.getLogger(), _Records()
    level = root.level
    root.addHandler(log)
    root.setLevel(logging.INFO)
    try:
        qstate, report = quant.calibrate(model, params, "w8a8", images=images, texts=TEXTS,
                                         return_report=True)
    finally:
        root.removeHandler(log)
        root.setLevel(level)
    return model, params, images, qstate, report, log.records


def test_site_sqnr_matches_numpy_references(tiny_calibrated):
    model, params, images, qstate, report, _ = tiny_calibrated
    got = {(s.site, s.tensor): s for s in report.sites}
    # An image site, on the final calibration batch.
    name = f"visual/{MLP_INPUT}"
    x = _site_input(model, params, qstate, jnp.asarray(images[-1]), model.encode_image, name)
    site = got[(name, "activation")]
    assert site.bits == 8
    np.testing.assert_allclose(site.sqnr_db, _sqnr_db(x, _uint8(x, qstate.acts[name])),
                               atol=0.001)
    # A text site: positions after each prompt's end-of-text token do not count.
    name = f"text/{MLP_INPUT}"
    tokens = np.asarray(clip.tokenize(TEXTS))
    lengths = np.argmax(tokens, axis=-1) + 1  # end-of-text is the largest id
    tokens = tokens[:, :lengths.max()]
    x = _site_input(model, params, qstate, jnp.asarray(tokens), model.encode_text, name)
    valid = (np.arange(tokens.shape[1])[None, :] < lengths[:, None])[..., None]
    want = _sqnr_db(x, _uint8(x, qstate.acts[name]), valid)
    assert abs(want - _sqnr_db(x, _uint8(x, qstate.acts[name]))) > 0.005  # padding differs
    np.testing.assert_allclose(got[(name, "activation")].sqnr_db, want, atol=0.001)
    # A kernel: symmetric int8 per output channel.
    w = np.asarray(params["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"],
                   np.float64)
    s = np.asarray(qstate.weights[f"visual/{MLP_INPUT}"].scale, np.float64)
    np.testing.assert_allclose(got[(f"visual/{MLP_INPUT}", "weight")].sqnr_db,
                               _sqnr_db(w, np.clip(np.round(w / s), -128, 127) * s), atol=0.001)
    # Every quantized site is there, worst first.
    assert {n for n, t in got if t == "activation"} == set(qstate.acts)
    assert {n for n, t in got if t == "weight"} == set(qstate.weights)
    values = [s.sqnr_db for s in report.sites]
    assert values == sorted(values)


def test_cosines_are_those_of_the_final_batch(tiny_calibrated):
    model, params, images, qstate, report, _ = tiny_calibrated
    fp = np.asarray(clip.encode_image(model, params, images[-1]), np.float64)
    q = np.asarray(clip.encode_image(model, params, images[-1], qstate=qstate), np.float64)
    cos = np.sum(fp * q, -1) / np.linalg.norm(fp, axis=-1) / np.linalg.norm(q, axis=-1)
    np.testing.assert_allclose([report.cosines["image"]["mean"], report.cosines["image"]["min"]],
                               [cos.mean(), cos.min()], atol=1e-5)
    assert set(report.cosines) == {"image", "text"}
    row = report.to_dict()
    assert row["cosine_to_fp"] == report.cosines
    assert [s["site"] for s in row["worst_sites"]] == [s.site for s in report.sites[:10]]
    assert set(row["worst_sites"][0]) == {"site", "tensor", "bits", "sqnr_db"}


def test_a_healthy_model_logs_no_warning(tiny_calibrated):
    records = tiny_calibrated[-1]
    assert any("PTQ: cosine to FP on the calibration data" in r.getMessage() for r in records)
    assert not [r for r in records if r.levelno >= logging.WARNING]


def test_a_generator_of_images_is_diagnosed_on_its_last_batch(tiny_calibrated):
    model, params, images, _, report, _ = tiny_calibrated
    _, streamed = quant.calibrate(model, params, "w8a8", images=(b for b in images),
                                  num_images=8, texts=TEXTS, return_report=True)
    for tower in ("image", "text"):
        assert streamed.cosines[tower] == pytest.approx(report.cosines[tower])
    assert [s.site for s in streamed.sites] == [s.site for s in report.sites]
