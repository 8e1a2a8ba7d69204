"""The speed rules (docs/design.md, "Speed rules (where the time goes)") change the cost,
not the math: each switched off gives the same loss and gradients (shared text prefix,
cropping after the last EOT, cached features, length buckets, remat)."""

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p4q_jax import clip
from p4q_jax import evaluate
from p4q_jax import parallel
from p4q_jax import quant
from p4q_jax.p4q import adapter as adapter_lib
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import step as step_lib

CLASSES = ["cat", "golden retriever", "fire truck", "ship", "sea lion", "tree"]
N_CTX = 4


@pytest.fixture(scope="module")
def setup():
    """The tiny CLIP, its "w8a8" (text tower only: the tests that use it compare text-tower
    paths) and "w4a4attn8" (both towers: cached image features against the in-step image
    tower) calibrations, FP class text features, an adapter and prompts, images, labels."""
    model, params = clip.init("tiny", seed=3)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    texts = [f"a photo of a {c}." for c in CLASSES]
    w8a8 = quant.QConfig.parse("w8a8")
    qstates = {
        "w8a8": quant.calibrate(model, params, quant.QConfig(name="w8a8-text", rules=w8a8.rules,
                                                             towers=("text",)), texts=texts),
        "w4a4attn8": quant.calibrate(model, params, quant.QConfig.parse("w4a4attn8"),
                                     images=[images], texts=texts)}
    fp_text = clip.encode_text(model, params, clip.tokenize(texts))
    adapter = adapter_lib.QAdapter()
    trainable = {
        "context": prompts_lib.init_context(jax.random.key(0), n_ctx=N_CTX, width=64),
        "adapter": adapter.init(jax.random.key(1), jnp.zeros((1, 64)))["params"],
    }
    labels = rng.integers(0, len(CLASSES), size=len(images)).astype(np.int32)
    return model, params, qstates, evaluate.normalize(fp_text), adapter, trainable, images, labels


def _frozen(model, params, qstate, prompts, teacher_text):
    return step_lib.Frozen(
        params=params, qstate=qstate,
        token_embeddings=model.apply({"params": params}, prompts.tokens, method=model.embed_tokens),
        eot=jnp.asarray(prompts.eot), teacher_text=teacher_text,
        logit_scale=jnp.exp(params["logit_scale"]))


def _loss_and_grads(setup, *, qstate_name=None, position="end", crop=True, shared_prefix=True,
                    cached=True, context=None, remat="off", length_buckets=1, train=True):
    model, params, qstates, teacher_text, adapter, trainable, images, labels = setup
    model = model.clone(text_remat=remat)
    qstate = qstates.get(qstate_name)
    prompts = prompts_lib.build(CLASSES, n_ctx=N_CTX, position=position, crop=crop)
    frozen = step_lib.make_frozen(model, params, qstate, prompts, teacher_text,
                                  image_towers=not cached, train=train)
    if cached:
        batch = jax.jit(step_lib.paired_image_features, static_argnums=0)(model, params, qstate, images)
        batch["label"] = labels
    else:
        batch = {"image": images, "label": labels}
    trainable = dict(trainable, context=trainable["context"] if context is None else context)
    # The frozen inputs are arguments, not constants folded into the program.
    fn = jax.jit(jax.value_and_grad(
        lambda t, f, b: step_lib.loss_fn(t, f, b, model=model, prompts=prompts, adapter=adapter,
                                         weights=step_lib.LossWeights(),
                                         shared_prefix=shared_prefix,
                                         length_buckets=length_buckets),
        has_aux=True))
    (loss, _), grads = fn(trainable, frozen, batch)
    return float(loss), grads


@pytest.fixture(scope="module")
def loss_and_grads(setup):
    """`_loss_and_grads` of `setup`, each configuration computed once for the module: the
    reference step (every speed rule on) and its no-prefix twin are the other side of
    several tests' comparisons, so they are traced and compiled once, not per test."""
    signature = inspect.signature(_loss_and_grads)
    results = {}

    def get(**kwargs):
        bound = signature.bind(setup, **kwargs)
        bound.apply_defaults()
        key = tuple((k, v) for k, v in bound.arguments.items() if k != "setup")
        if key not in results:
            results[key] = _loss_and_grads(setup, **kwargs)
        return results[key]

    return get


def _assert_same(a, b, *, rtol, atol):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a == pytest.approx(loss_b, rel=rtol, abs=atol)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        scale = float(jnp.abs(gb).max())
        np.testing.assert_allclose(ga, gb, atol=atol + rtol * scale)


def test_prefix_covers_start_and_context():
    end = prompts_lib.build(CLASSES, n_ctx=N_CTX, position="end")
    middle = prompts_lib.build(CLASSES, n_ctx=N_CTX, position="middle")
    front = prompts_lib.build(CLASSES, n_ctx=N_CTX, position="front")
    assert (end.shared_prefix, middle.shared_prefix, front.shared_prefix) == (
        1 + N_CTX, 1 + N_CTX // 2, 1)
    assert end.tokens.shape[1] == int(end.eot.max()) + 1
    assert prompts_lib.build(CLASSES, n_ctx=N_CTX, crop=False).tokens.shape[1] == 77


@pytest.mark.parametrize("position", ["end", "middle"])
def test_prefixed_text_tower_equals_full_sequences(setup, position):
    model, params, *_ = setup
    prompts = prompts_lib.build(CLASSES, n_ctx=N_CTX, position=position)
    context = prompts_lib.init_context(jax.random.key(2), n_ctx=N_CTX, width=64)
    frozen = _frozen(model, params, None, prompts, None)
    full, prefixed = jax.jit(lambda f, c: [  # one program, not one per operation
        step_lib.class_text_features(model, f, prompts, c, shared_prefix=shared_prefix)
        for shared_prefix in (False, True)])(frozen, context)
    np.testing.assert_allclose(prefixed, full, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(full[0] - full[1]).max()) > 1e-2  # the classes do differ


@pytest.mark.parametrize("position", ["end", "middle"])
def test_shared_prefix_same_loss_and_gradients(loss_and_grads, position):
    on = loss_and_grads(position=position, shared_prefix=True)
    off = loss_and_grads(position=position, shared_prefix=False)
    _assert_same(on, off, rtol=1e-5, atol=1e-6)


def test_shared_prefix_same_loss_and_gradients_quantized(loss_and_grads):
    """Through the 8-bit text tower float re-association may flip a rounding now and then, so
    the tolerance is that of one quantization step, not of float rounding."""
    on = loss_and_grads(qstate_name="w8a8", shared_prefix=True)
    off = loss_and_grads(qstate_name="w8a8", shared_prefix=False)
    _assert_same(on, off, rtol=2e-2, atol=1e-3)


def test_a_train_step_multiplies_the_calibrated_kernels_not_their_codes(setup,
                                                                          loss_and_grads):
    """docs/design.md, "Straight-through quantizers and frozen weights": never re-quantize
    frozen weights per step. A train step's quantized
    matmuls (`make_frozen(train=True)`) multiply the fake-quantized kernels as calibrated;
    evaluation's run on their integer codes (the int8 path's arithmetic), which rounds every
    kernel once per call. The two differ by float rounding: the same loss and gradients to
    one quantization step."""
    model, params, qstates, teacher_text, *_ = setup
    prompts = prompts_lib.build(CLASSES, n_ctx=N_CTX)
    context = prompts_lib.init_context(jax.random.key(2), n_ctx=N_CTX, width=64)
    in_proj = params["text"]["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"]
    kernel_type = f"tensor<{in_proj.shape[0]}x{in_proj.shape[1]}xf32>"

    def kernel_roundings(train):
        frozen = step_lib.make_frozen(model, params, qstates["w8a8"], prompts, teacher_text,
                                      train=train)
        text = jax.jit(lambda f: step_lib.class_text_features(
            model, f, prompts, context, shared_prefix=True)).lower(frozen).as_text()
        return sum(1 for line in text.splitlines()
                   if "round_nearest_even" in line and line.endswith(kernel_type))

    assert kernel_roundings(train=False) > 0
    assert kernel_roundings(train=True) == 0
    _assert_same(loss_and_grads(qstate_name="w8a8", train=True),
                 loss_and_grads(qstate_name="w8a8", train=False), rtol=2e-2, atol=1e-3)


def test_cropping_after_last_eot_same_loss_and_gradients(loss_and_grads):
    cropped = loss_and_grads(crop=True, shared_prefix=False)
    full = loss_and_grads(crop=False, shared_prefix=False)
    _assert_same(cropped, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qstate_name", [None, "w4a4attn8"])
def test_cached_features_same_loss_and_gradients(loss_and_grads, qstate_name):
    """Cached: the step holds the text tower only (quantized kernels swapped in once)."""
    cached = loss_and_grads(qstate_name=qstate_name, cached=True)
    in_step = loss_and_grads(qstate_name=qstate_name, cached=False)
    _assert_same(cached, in_step, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat, qstate_name, shared_prefix", [
    ("blocks", None, True), ("dots", None, False), ("blocks", "w4a4attn8", True)])
def test_rematerialised_text_blocks_same_loss_and_gradients(loss_and_grads, remat, qstate_name,
                                                            shared_prefix):
    """speed.remat recomputes the text blocks in the backward pass: the same loss and
    gradients (the quantized tower included: the recomputation rounds the same values)."""
    kwargs = dict(qstate_name=qstate_name, shared_prefix=shared_prefix)
    _assert_same(loss_and_grads(remat=remat, **kwargs), loss_and_grads(**kwargs),
                 rtol=1e-5, atol=1e-6)


def test_class_specific_context_takes_the_full_path(setup):
    context = prompts_lib.init_context(jax.random.key(4), n_ctx=N_CTX, width=64,
                                       num_classes=len(CLASSES))
    on = _loss_and_grads(setup, shared_prefix=True, context=context)
    off = _loss_and_grads(setup, shared_prefix=False, context=context)
    _assert_same(on, off, rtol=0, atol=0)
    assert on[1]["context"].shape == context.shape


def test_remat_wraps_each_text_block_only(setup):
    model, params = setup[:2]
    tokens, images = clip.tokenize(["a photo of a cat."]), np.zeros((1, 32, 32, 3), np.float32)

    def remats(m, method, x):
        program = jax.make_jaxpr(lambda p: m.apply({"params": p}, x, method=method))(params)
        return str(program).count("remat")

    remat = model.clone(text_remat="blocks")
    assert remats(model, model.encode_text, tokens) == 0
    assert remats(remat, remat.encode_text, tokens) == model.config.text.layers
    assert remats(remat, remat.encode_image, images) == 0


def test_length_buckets_leave_the_fewest_padded_positions():
    """Against brute force over every way to cut the sorted lengths into <= k groups."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        eot = rng.integers(5, 20, size=rng.integers(1, 30))
        start, k = int(rng.integers(0, 5)), int(rng.integers(1, 5))
        groups = prompts_lib.length_buckets(eot, start, k)
        need = eot + 1 - start
        assert len(groups) <= k
        assert sorted(np.concatenate([g for g, _ in groups])) == list(range(len(eot)))
        for index, n in groups:
            assert n == need[index].max()  # padded to its own longest only
        distinct = sorted(set(need))
        best = min(
            sum(max(part) * sum(int(np.sum(need == d)) for d in part)
                for part in np.split(distinct, list(cuts)))
            for g in range(min(k, len(distinct)))
            for cuts in itertools.combinations(range(1, len(distinct)), g))
        assert sum(n * len(index) for index, n in groups) == best


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_length_buckets_same_loss_and_gradients(loss_and_grads, shared_prefix):
    """The class names here run from 1 to 3 tokens: three groups instead of one padding."""
    prompts = prompts_lib.build(CLASSES, n_ctx=N_CTX)
    assert len(prompts_lib.length_buckets(prompts.eot, prompts.shared_prefix, 4)) > 1
    bucketed = loss_and_grads(shared_prefix=shared_prefix, length_buckets=4)
    padded = loss_and_grads(shared_prefix=shared_prefix)
    _assert_same(bucketed, padded, rtol=1e-5, atol=1e-6)


def test_length_buckets_same_loss_and_gradients_quantized(loss_and_grads):
    """Through the 4-bit text tower: within one quantization step (see the shared prefix)."""
    bucketed = loss_and_grads(qstate_name="w4a4attn8", length_buckets=4)
    padded = loss_and_grads(qstate_name="w4a4attn8")
    _assert_same(bucketed, padded, rtol=2e-2, atol=1e-3)


def test_xla_schedule_auto_picks_memory_for_many_classes_or_remat():
    schedule = step_lib.xla_schedule
    many = step_lib.MEMORY_SCHEDULE_MIN_CLASSES
    assert schedule("auto", num_classes=100) == "concurrency"
    assert schedule("auto", num_classes=many - 1) == "concurrency"
    assert schedule("auto", num_classes=many) == "memory"
    assert schedule("auto", num_classes=10, remat="blocks") == "memory"
    assert schedule("concurrency", num_classes=1000, remat="dots") == "concurrency"
    assert schedule("memory", num_classes=2) == "memory"
    with pytest.raises(ValueError, match="speed.xla_schedule='fast'"):
        schedule("fast", num_classes=10)


def test_memory_schedule_same_step_in_less_scratch(setup):
    """XLA:CPU's memory schedule runs the same step in far less scratch memory: a
    rematerialised 4-bit step over 300 classes, one step from the same state."""
    model, params, qstates, _, adapter, trainable, images, _ = setup
    model = model.clone(text_remat="blocks")
    classes = [f"{name} number {i}" for i in range(50) for name in CLASSES]
    prompts = prompts_lib.build(classes, n_ctx=N_CTX)
    teacher = evaluate.normalize(np.random.default_rng(1).normal(size=(len(classes), 64)))
    frozen = step_lib.make_frozen(model, params, qstates["w4a4attn8"], prompts,
                                  teacher.astype(np.float32), train=True)
    batch = jax.jit(step_lib.paired_image_features, static_argnums=0)(
        model, params, qstates["w4a4attn8"], images)
    batch["label"] = np.arange(len(images), dtype=np.int32) * 37
    tx = step_lib.optimizer(step_lib.schedules(prompt_lr=0.5, adapter_lr=1e-2, total_steps=10))
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    runs = {}
    for schedule in ("concurrency", "memory"):
        train_step = step_lib.make_train_step(
            model=model, prompts=prompts, adapter=adapter, tx=tx, weights=step_lib.LossWeights(),
            mesh=mesh, length_buckets=4, schedule=schedule)
        state = step_lib.init_state(jax.tree.map(jnp.array, trainable), tx)
        compiled = train_step.lower(state, frozen, batch).compile()
        runs[schedule] = (compiled.memory_analysis().temp_size_in_bytes,
                          *compiled(state, frozen, batch))
    (temp_c, state_c, metrics_c), (temp_m, state_m, metrics_m) = runs.values()
    assert temp_m < 0.7 * temp_c
    for name in metrics_c:
        assert float(metrics_m[name]) == pytest.approx(float(metrics_c[name]), rel=1e-6), name
    # The two schedules sum in different orders: the learned context ended up to 9.5e-7 apart
    # (AMD EPYC, the suite's XLA flags) after a step that moved each entry by 3e-4 to 1.35.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5),
                 state_m.trainable, state_c.trainable)
