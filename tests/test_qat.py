"""QAT (LSQ): the learned-step quantizer against the paper's formula in numpy, the QAT train
step (every kernel and step learns, the loss falls, sharded = unsharded), exact resume and
the export's reload."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax.quant import lsq
from p4q_jax.quant import primitives


def _paper_lsq(x, s, z, w, qmin, qmax, n):
    """Esser et al. 2020, eq. 1-3, on the grid [Qn, Qp] = [qmin - z, qmax - z] of a fixed
    zero point z: the forward round(clip(x / s, Qn, Qp)) * s and the gradients of sum(w *
    x_hat) w.r.t. x (straight through inside) and s (-x/s + round(x/s) inside, Qn / Qp
    outside), the latter times g = 1 / sqrt(N * qmax). float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    v = x / s
    lo, hi = qmin - z, qmax - z
    y = np.round(np.clip(v, lo, hi)) * s
    inside = (v >= lo) & (v <= hi)
    gx = np.where(inside, w, 0.0)
    ds = np.where(v < lo, lo, np.where(v > hi, hi, -v + np.round(v)))
    g = 1.0 / np.sqrt(n * qmax)
    return y, gx, g * np.sum(w * ds)


def _lsq_grads(x, s, z, w, fmt, n):
    loss = lambda x, s: jnp.sum(lsq.fake_quant(x, s, z, fmt, per_step_elements=n) * w)
    y = lsq.fake_quant(jnp.asarray(x), jnp.float32(s), jnp.float32(z), fmt,
                       per_step_elements=n)
    gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.float32(s))
    return np.asarray(y), np.asarray(gx), float(gs)


@pytest.mark.parametrize(("bits", "signed", "z"), [(4, True, 0), (8, True, 0), (4, False, 3),
                                                   (8, False, 37), (2, False, 1)])
def test_lsq_matches_the_papers_gradient(bits, signed, z):
    """A kernel-like tensor (N = all its elements) and an activation batch (N = features per
    example), values on both sides of the grid; off-tie values (a tie rounds either way)."""
    fmt = primitives.IntFormat(bits=bits, signed=signed)
    s = 0.0625  # exact in binary: x / s and the grid ends are exact
    rng = np.random.default_rng(bits * 10 + z)
    codes = rng.integers(fmt.qmin - z - 4, fmt.qmax - z + 5, size=(4, 6, 5))
    frac = rng.uniform(-0.45, 0.45, size=codes.shape)
    x = ((codes + frac) * s).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    for n in (x.size, x[0].size):  # weight: all elements; activation: one example's
        y_ref, gx_ref, gs_ref = _paper_lsq(x, s, z, w, fmt.qmin, fmt.qmax, n)
        assert (gx_ref == 0).any() and (gx_ref != 0).any()  # clipped and inside both occur
        y, gx, gs = _lsq_grads(x, s, z, w, fmt, n)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(gx, gx_ref.astype(np.float32))
        np.testing.assert_allclose(gs, gs_ref, rtol=1e-5)


def test_lsq_features_per_example():
    """N_F: one example's elements per step (per tensor), per channel each channel's."""
    x = jnp.zeros((8, 5, 12))
    assert lsq.features_per_example(x, jnp.zeros((1, 1, 1))) == 60
    assert lsq.features_per_example(x, jnp.zeros((1, 1, 12))) == 5


def test_lsq_zero_point_gets_no_gradient():
    fmt = primitives.IntFormat(bits=4, signed=False)
    x = jnp.linspace(-2.0, 2.0, 33)
    gz = jax.grad(lambda z: jnp.sum(lsq.fake_quant(x, 0.1, z, fmt) ** 2))(jnp.float32(5.0))
    assert float(gz) == 0.0


# --- the QAT step, loop and export (tiny CLIP, 4 fake CPU devices) --------------------------

from p4q_jax import clip  # noqa: E402
from p4q_jax import jobs  # noqa: E402
from p4q_jax import parallel  # noqa: E402
from p4q_jax import qat  # noqa: E402
from p4q_jax.configs import qat as qat_config  # noqa: E402
from p4q_jax.p4q import classifier as classifier_lib  # noqa: E402
from p4q_jax.quant import sites  # noqa: E402

_NAMES = ("airplane", "automobile", "bird")  # synthetic's first 3: the job's step is the same


def _config(**train):
    config = qat_config.get_config()
    config.model.name = "tiny"
    config.data.update(dict(name="synthetic", synthetic_classes=3, synthetic_examples=16))
    config.train.update(dict(batch_size=8, num_steps=4, log_every=1, **train))
    config.p4q.n_ctx = 4
    config.qat.update(dict(lr=1e-3, scale_lr=1e-3))  # a few steps must move every leaf
    config.mesh.update(dict(data=2, model=2, shard_min_size=1024))  # tiny kernels are split
    config.checkpoint.update(dict(every_steps=2, async_save=False))
    return config


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _job_config():
    config = _config()
    config.update_from_flattened_dict({"quant.calib_batches": 1, "quant.calib_batch_size": 8,
                                       "eval.batch_size": 8, "eval.text_batch_size": 16,
                                       "data.synthetic_examples": 16})
    return config


@pytest.fixture(scope="module")
def qat_job(tmp_path_factory):
    """`--mode=qat` in process, its QAT training recorded: {"out": the job's results,
    "workdir", "config" and "train": what the job handed `qat.train` (params and QState as
    host copies: the calibrated model, its teacher, the mesh), "straight": its Result}. One
    job serves the module: its rows and export, the straight run the resume test repeats, and
    the calibrated model the step tests train."""
    workdir = tmp_path_factory.mktemp("qat") / "qat"
    train, recorded = qat.train, {}

    def recording(config, **kwargs):
        recorded["config"] = config
        recorded["train"] = dict(kwargs, params=_host(kwargs["params"]),
                                 qstate=_host(kwargs["qstate"]))  # before the step donates
        recorded["straight"] = train(config, **kwargs)
        return recorded["straight"]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(qat, "train", recording)
        out = jobs.run(_job_config(), workdir, mode="qat")
    return dict(out=out, workdir=workdir, **recorded)


@pytest.fixture(scope="module")
def tiny_qat(qat_job):
    """(model, params, calibrated w4a4attn8 QState, zero-shot teacher, a batch): the job's."""
    train = qat_job["train"]
    assert tuple(train["class_names"]) == _NAMES
    images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    batch = {"image": images, "label": np.arange(8, dtype=np.int32) % 3}
    return train["model"], train["params"], train["qstate"], train["teacher"], batch


def _setup(tiny_qat, mesh, config=None):
    model, params, qstate, teacher, _ = tiny_qat
    return qat.setup(config or _config(), model=model, params=params, qstate=qstate,
                     teacher=teacher, class_names=_NAMES, mesh=mesh)


@pytest.fixture(scope="module")
def stepped(tiny_qat):
    """Four steps on one batch on a (data 2, model 2) mesh: {"replicated": {leaf path of the
    state: whether fully replicated}, "first" / "last": the trainable before and after four
    steps, "one": the state after one (host), "losses"}."""
    mesh = parallel.make_mesh(data=2, model=2)
    run = _setup(tiny_qat, mesh)
    out = {"replicated": {jax.tree_util.keystr(path): leaf.sharding.is_fully_replicated
                          for path, leaf in jax.tree_util.tree_flatten_with_path(run.state)[0]},
           "first": _host(run.state.trainable), "losses": []}
    batch = parallel.to_global(tiny_qat[4], mesh)
    state = run.state
    for _ in range(4):
        state, metrics = run.train_step(state, run.fixed, batch)
        out["losses"].append(float(metrics["loss"]))
        out.setdefault("one", _host(state))
    out["last"] = _host(state.trainable)
    return out


def test_qat_state_is_split_over_the_mesh(stepped):
    split = [p for p, replicated in stepped["replicated"].items() if not replicated]
    # The tower kernels and both Adam moments of them are split over `model`.
    assert any("visual" in p and "kernel" in p and "opt_state" not in p for p in split)
    assert any("opt_state" in p and "mu" in p for p in split)
    assert any("opt_state" in p and "nu" in p for p in split)
    first = stepped["first"]
    assert qat.num_params(first) == (qat.num_params(first["params"]) + first["context"].size
                                     + qat.num_params(first["scales"]))


def test_qat_changes_every_kernel_and_step_and_its_loss_falls(stepped, tiny_qat):
    first, last, losses = stepped["first"], stepped["last"], stepped["losses"]
    qstate = tiny_qat[2]
    before, after = sites.kernels(first["params"]), sites.kernels(last["params"])
    assert set(qstate.weights) <= set(before)
    unchanged = [n for n in before if np.array_equal(before[n], after[n])]
    assert not unchanged, unchanged
    for kind in ("acts", "weights"):
        assert set(first["scales"][kind]) == set(getattr(qstate, kind))
        same = [n for n in first["scales"][kind]
                if np.array_equal(first["scales"][kind][n], last["scales"][kind][n])]
        assert not same, (kind, same)
        for n, s in first["scales"][kind].items():  # initialised from the PTQ calibration
            np.testing.assert_array_equal(s, np.asarray(getattr(qstate, kind)[n].scale))
    assert not np.array_equal(first["context"], last["context"])
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses  # far above float re-association noise


def test_a_step_pushed_below_zero_stays_positive(tiny_qat):
    """Adam at scale_lr=1 moves a step by far more than any tiny-CLIP step's size (all below
    0.5): without the projection, one update turns steps negative (seen: this test fails)."""
    one = parallel.make_mesh(devices=jax.devices()[:1])
    config = _config()
    config.qat.scale_lr = 1.0
    run = _setup(tiny_qat, one, config)
    calibrated = _host(run.fixed.quant.scales())
    state, _ = run.train_step(run.state, run.fixed, parallel.to_global(tiny_qat[4], one))
    after = _host(state.trainable["scales"])
    floored = 0
    for kind in ("acts", "weights"):
        for name, c in calibrated[kind].items():
            assert np.all((0 < c) & (c < 0.5)), (kind, name)
            floor = np.float32(lsq.MIN_STEP_FRACTION) * c
            assert np.all(after[kind][name] >= floor), (kind, name)
            floored += int(np.sum(after[kind][name] == floor))
    assert floored > 0  # the bound was reached, so the projection did the work


def _moments(state):
    """{path: Adam's first moment} of a state: after one step, (1 - b1) x the gradient."""
    return {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if ".mu" in
            jax.tree_util.keystr(p)}


def test_sharded_qat_step_equals_the_unsharded_one(stepped, tiny_qat):
    """The same loss and gradients up to float re-association (Adam's first moments after
    one step; Adam's first update,
    about lr x sign(g), would magnify float re-association where a gradient is ~0), and the
    same prompts (SGD)."""
    one = parallel.make_mesh(devices=jax.devices()[:1])
    run = _setup(tiny_qat, one)
    state, metrics = run.train_step(run.state, run.fixed, parallel.to_global(tiny_qat[4], one))
    assert abs(float(metrics["loss"]) - stepped["losses"][0]) < 1e-5
    single, sharded = _moments(_host(state)), _moments(stepped["one"])
    assert single.keys() == sharded.keys() and len(single) == len(
        jax.tree.leaves(stepped["first"]["params"])) + len(jax.tree.leaves(
            stepped["first"]["scales"]))
    group = lambda path: next((g for g in ("'acts'", "'weights'") if g in path), "params")
    largest = {}
    for path, mu in single.items():
        largest[group(path)] = max(largest.get(group(path), 0.0), float(np.abs(mu).max()))
    assert min(largest.values()) > 0
    for path, mu in single.items():  # a step's gradient sums many terms that cancel
        np.testing.assert_allclose(sharded[path], mu, rtol=1e-3,
                                   atol=1e-4 * largest[group(path)], err_msg=path)
    np.testing.assert_allclose(stepped["one"].trainable["context"],
                               np.asarray(state.trainable["context"]), rtol=1e-5, atol=1e-7)


def _train(qat_job, workdir):
    """`qat.train` as the job ran it (its config, calibrated model, teacher and mesh)."""
    train = {k: v for k, v in qat_job["train"].items() if k not in ("workdir", "phases")}
    return qat.train(qat_job["config"], **train, workdir=workdir)


class _Killed(Exception):
    pass


def test_qat_resumes_exactly_and_its_export_reloads(qat_job, tiny_qat, tmp_path, monkeypatch):
    """The job's 4 steps in one go == 2 steps, killed (after the step-2 checkpoint), then
    resumed from it; the job's export of the result gives the same features once reloaded,
    and those are the trained LSQ towers' (`lsq.to_qstate` keeps the learned steps)."""
    straight = qat_job["straight"]
    make, calls = qat.make_train_step, []

    def counted_step(limit):
        def make_counted(**kwargs):
            step = make(**kwargs)

            def counted(*args):
                if len(calls) == limit:
                    raise _Killed()
                calls.append(int(args[0].step))
                return step(*args)

            return counted

        return make_counted

    with monkeypatch.context() as m:
        m.setattr(qat, "make_train_step", counted_step(limit=2))
        with pytest.raises(_Killed):
            _train(qat_job, tmp_path / "resumed")
        m.setattr(qat, "make_train_step", counted_step(limit=None))
        resumed = _train(qat_job, tmp_path / "resumed")
    assert calls == [0, 1, 2, 3]  # the second run stepped from the checkpoint at step 2
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(jax.tree.leaves((straight.params, straight.qstate, straight.trained.context)),
                    jax.tree.leaves((resumed.params, resumed.qstate, resumed.trained.context))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert straight.trainable_params == qat.num_params(
        {n: straight.params[n] for n in ("visual", "text")}) + straight.trained.context.size + \
        sum(np.size(p.scale) for d in (straight.qstate.acts, straight.qstate.weights)
            for p in d.values())

    model = tiny_qat[0]
    model2, params2, qstate2, trained2 = classifier_lib.load(qat_job["workdir"] / "export")
    images = tiny_qat[4]["image"]

    def features(trained, params, qstate):
        variables = trained.variables(params, qstate)
        return (np.asarray(trained.class_features(model, variables)),
                np.asarray(trained.image_features(model, variables, images)))

    reloaded = features(trained2, params2, qstate2)
    for saved, loaded in zip(features(straight.trained, straight.params, straight.qstate),
                             reloaded):
        np.testing.assert_allclose(loaded, saved, rtol=0, atol=1e-6)
    # The QState evaluated (integer path) is the trained model: the LSQ forward's features.
    # The two quantize activations computed in different orders (int32 sums, float sums), so
    # one that lands on a rounding boundary can take the neighbouring code in one of them:
    # on a (2, 2) mesh (AMD EPYC) 7 of the 8 images agreed to 1e-6 and one moved by 0.41.
    lsq_features = clip.encode.apply(model, straight.params, images, method=model.encode_image,
                                     qstate=straight.quant)
    lsq_gap = np.abs(reloaded[1] - np.asarray(lsq_features)).max(-1)
    assert np.sum(lsq_gap > 1e-5) <= 1, lsq_gap
    # The export holds the trained towers, not the calibrated ones: every image's features
    # moved (by 0.53 to 1.22 in that run).
    calibrated = features(straight.trained, tiny_qat[1], tiny_qat[2])
    calibrated_gap = np.abs(calibrated[1] - reloaded[1]).max(-1)
    assert np.all(calibrated_gap > 0.1), calibrated_gap


def test_qat_job_rows_export_and_eval(qat_job, tiny_qat, tmp_path):
    """`--mode=qat` in process: FP, PTQ and QAT rows (the QAT one with its trainable
    parameters: the towers, every step and the prompts), an export that `--mode=eval`
    scores as the job did."""
    config, out = qat_job["config"], qat_job["out"]
    assert [row["method"] for row in out["rows"]] == ["fp_zeroshot", "ptq", "qat"]
    row = out["rows"][-1]
    assert row["qconfig"] == "w4a4attn8" and row["recipe"]["towers"] == "trained (LSQ)"
    model, params = tiny_qat[:2]
    towers = qat.num_params({n: params[n] for n in ("visual", "text")})
    assert row["trainable_params"] > towers + config.p4q.n_ctx * model.config.text.width
    assert [h["step"] for h in out["history"]] == [1, 2, 3, 4]
    export = qat_job["workdir"] / "export"
    meta = classifier_lib.read_meta(export)
    assert meta["quantized"] and meta["adapter"] is None and meta["origin"]["method"] == "qat"
    eval_config = _config()
    eval_config.update_from_flattened_dict({"eval.batch_size": 8, "eval.text_batch_size": 16,
                                            "p4q.export_dir": str(export)})
    scored = jobs.run(eval_config, tmp_path / "eval", mode="eval")["rows"][0]
    assert scored["method"] == "qat"
    assert (scored["top1"], scored["top5"], scored["count"]) == (row["top1"], row["top5"],
                                                                 row["count"])


@pytest.mark.parametrize(("fields", "named"), [
    ({"qat.lr": 0.0}, "qat.lr"), ({"qat.scale_lr": -1.0}, "qat.scale_lr"),
    ({"qat.weight_decay": -0.1}, "qat.weight_decay"), ({"p4q.adapter": True}, "p4q.adapter"),
    ({"train.schedule": "coop"}, "train.schedule")])
def test_preflight_checks_the_qat_fields(tmp_path, fields, named):
    from p4q_jax import preflight  # pylint: disable=g-import-not-at-top
    config = _config()
    config.update_from_flattened_dict(fields)
    with pytest.raises(preflight.ConfigError, match=named.replace(".", r"\.")):
        preflight.check(config, tmp_path, mode="qat")
