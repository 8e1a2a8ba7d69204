"""Importing the public P4Q code's files (`p4q.import_official`): the released adapter against
a torch reference of the public QAdapter's float forward, the prompt learner's format, the
errors, and an import of a tiny CLIP that `classifier.load` and `main.py --mode=eval` read."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from p4q_jax.clip import tokenizer as tokenizer_lib
from p4q_jax.p4q import import_official
from p4q_jax.p4q import prompts as prompts_lib
from p4q_jax.p4q import classifier as classifier_lib

import main_runner

RELEASED = pathlib.Path(__file__).parent / "data" / "p4q_official" / "p4q_adapter.pth"


def _public_adapter_forward(state, x, ratio=0.2):
    """models/dq_qadapt_coop.py's QAdapter in float (its quantizers off: quant=False) and the
    blend of CLIP.forward: ratio * fc(x) + (1 - ratio) * x."""
    h = F.relu(F.linear(x, state["fc.in_fc.weight"], state["fc.in_fc.bias"]))
    return ratio * F.linear(h, state["fc.out_fc.weight"], state["fc.out_fc.bias"]) \
        + (1 - ratio) * x


def test_released_adapter_forward_equals_the_public_one():
    adapter, params = import_official.read_adapter(RELEASED, width=512)
    assert (adapter.reduction, adapter.ratio) == (4, 0.2)
    state = torch.load(RELEASED, map_location="cpu", weights_only=True)["model_state_dict"]
    x = np.random.default_rng(0).normal(scale=0.5, size=(64, 512))  # ViT-B/32 feature scale
    expected = _public_adapter_forward({k: v.double() for k, v in state.items()},
                                       torch.tensor(x)).numpy()
    with jax.enable_x64(True):  # the mapping, free of float32 summation order
        ours = np.asarray(adapter.apply(
            {"params": jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)},
            jnp.asarray(x)))
    assert np.abs(ours - expected).max() < 1e-6
    ours32 = np.asarray(adapter.apply({"params": params}, x.astype(np.float32)))
    np.testing.assert_allclose(ours32, expected, rtol=0, atol=1e-5)
    assert np.abs(expected - x).max() > 0.1  # the adapter changes the features


def _save(path, state, *, wrap=True):
    torch.save({"model_state_dict": state} if wrap else state, path)
    return path


def _prompt_state(n_cls=3, n_ctx=4, width=8, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"ctx": torch.randn(1, n_ctx, width, generator=g) * 0.02,  # PromptLearner.ctx
            "token_prefix": torch.randn(n_cls, 1, width, generator=g),
            "token_suffix": torch.randn(n_cls, 77 - 1 - n_ctx, width, generator=g)}


@pytest.mark.parametrize("prefix,squeeze", [("", False), ("module.", False), ("", True)])
def test_prompt_learner_round_trips(tmp_path, prefix, squeeze):
    state = _prompt_state()
    if squeeze:
        state["ctx"] = state["ctx"][0]
    path = _save(tmp_path / "pl.pth", {prefix + k: v for k, v in state.items()})
    context = import_official.read_context(path, width=8, num_classes=3)
    np.testing.assert_array_equal(context, state["ctx"].reshape(4, 8).numpy())


def test_prompt_layout_is_the_public_one():
    """PromptLearner tokenizes ' '.join(['x'] * n_ctx) + ' ' + name + '.' and replaces the
    n_ctx tokens after <start_of_text>; the layout built here has the same tokens elsewhere."""
    names, n_ctx = ["apple", "aquarium fish", "sweet pepper"], 16
    tok = tokenizer_lib.Tokenizer()
    built = prompts_lib.build(names, n_ctx=n_ctx, position="end", crop=False)
    for i, name in enumerate(names):
        public = tok.encode(" ".join(["x"] * n_ctx) + " " + name + ".")
        row = [tok.sot_id] + public + [tok.eot_id]
        np.testing.assert_array_equal(built.context_positions[i], np.arange(1, 1 + n_ctx))
        others = [j for j in range(len(row)) if not 1 <= j <= n_ctx]
        np.testing.assert_array_equal(built.tokens[i, others], np.asarray(row)[others])
        assert built.eot[i] == len(row) - 1


def _adapter_state(width=64, hidden=16, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"fc.in_fc.weight": torch.randn(hidden, width, generator=g) * 0.1,
            "fc.in_fc.bias": torch.randn(hidden, generator=g) * 0.1,
            "fc.out_fc.weight": torch.randn(width, hidden, generator=g) * 0.1,
            "fc.out_fc.bias": torch.randn(width, generator=g) * 0.1}


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"fc.in_fc.bias": torch.zeros(15)}),
     r"fc.in_fc.bias has shape \(15,\), expected \(16,\)"),
    (lambda s: s.update({"fc.out_fc.weight": torch.zeros(60, 16)}),
     r"fc.out_fc.weight has shape \(60, 16\), expected \(64, 16\)"),
    (lambda s: s.update({"fc.act_in_fc.scale": torch.zeros(1)}),
     r"unknown key\(s\) \['fc.act_in_fc.scale'\]"),
    (lambda s: s.pop("fc.out_fc.bias"), r"missing key\(s\) \['fc.out_fc.bias'\]"),
    (lambda s: s.update({"fc.in_fc.weight": torch.zeros(24, 64)}),
     "fc.in_fc.weight has 24 rows, which do not divide"),
])
def test_bad_adapter_files_name_the_file_and_key(tmp_path, change, message):
    state = _adapter_state()
    change(state)
    path = _save(tmp_path / "bad_adapter.pth", state)
    with pytest.raises(ValueError, match=message) as e:
        import_official.read_adapter(path, width=64)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"ctx": torch.zeros(1, 4, 7)}),
     r"ctx has shape \(1, 4, 7\), expected \[1, n_ctx, 8\]"),
    (lambda s: s.update({"ctx": torch.zeros(2, 4, 8)}), r"ctx has shape \(2, 4, 8\)"),
    (lambda s: s.update({"meta_net.weight": torch.zeros(2)}),
     r"unknown key\(s\) \['meta_net.weight'\]"),
    (lambda s: s.pop("ctx"), "no ctx key"),
    (lambda s: s.update({"token_suffix": torch.zeros(5, 72, 8)}),
     r"token_suffix has shape \(5, 72, 8\): prompts of 5 classes, but the dataset has 3"),
])
def test_bad_prompt_learner_files_name_the_file_and_key(tmp_path, change, message):
    state = _prompt_state()
    change(state)
    path = _save(tmp_path / "bad_pl.pth", state)
    with pytest.raises(ValueError, match=message) as e:
        import_official.read_context(path, width=8, num_classes=3)
    assert str(path) in str(e.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth: no such adapter file"):
        import_official.read_adapter(tmp_path / "nothing.pth", width=64)


def test_import_of_a_tiny_clip_is_an_export_that_eval_reads(tmp_path, tiny_checkpoint):
    adapter_state = _adapter_state()
    prompt_state = _prompt_state(n_cls=10, n_ctx=16, width=64, seed=1)  # synthetic: 10 classes
    adapter_file = _save(tmp_path / "p4q_adapter.pth", adapter_state)
    prompt_file = _save(tmp_path / "p4q_prompt_learner.pth", prompt_state)
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "p4q_jax.p4q.import_official", f"--adapter={adapter_file}",
         f"--prompt_learner={prompt_file}", f"--checkpoint={tiny_checkpoint}",
         "--dataset=synthetic", "--calib_batches=2", "--calib_batch_size=8", f"--out={out}"],
        cwd=main_runner.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    _, _, qstate, trained = classifier_lib.load(out)
    assert qstate.config.name == "official" and trained.position == "end"
    assert len(trained.class_names) == 10
    np.testing.assert_array_equal(trained.context, prompt_state["ctx"][0].numpy())
    np.testing.assert_array_equal(trained.adapter_params["fc1"]["kernel"],
                                  adapter_state["fc.in_fc.weight"].numpy().T)
    np.testing.assert_array_equal(trained.adapter_params["fc2"]["bias"],
                                  adapter_state["fc.out_fc.bias"].numpy())
    assert (trained.adapter.reduction, trained.adapter.ratio) == (4, 0.2)
    assert set(trained.adapter_qstate.acts) == {"fc1", "fc2"}

    main_runner.run_job([
        "--config=configs/cifar100_vitb32_official448.py", "--mode=eval",
        "--config.data.name=synthetic", f"--config.p4q.export_dir={out}",
        f"--workdir={tmp_path / 'eval'}"], mock_examples=None)
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    (row,) = results["rows"]
    assert row["qconfig"] == "official" and row["count"] > 0 and not results["transfer"]
