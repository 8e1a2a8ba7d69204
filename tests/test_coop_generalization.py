"""Generalization protocols on CoOp layouts: CoCoOp's base-to-new halves, ImageNet's test-only
variants, and exports evaluated on other classes (cross-dataset transfer)."""

import json
import os

import jax.numpy as jnp
import pytest

from p4q_jax import preflight
from p4q_jax.configs import coop_fewshot
from p4q_jax.data import coop
from p4q_jax.p4q import classifier as classifier_lib

import coop_layout
import coop_reference
import main_runner

NAMES = ["abyssinian", "beagle", "boxer", "chihuahua", "pug"]


@pytest.fixture(name="pets_root")
def _pets_root(tmp_path):
    coop_layout.split_dataset(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json",
                              NAMES, {"train": 5, "val": 2, "test": 2})
    return tmp_path


@pytest.mark.parametrize("subsample", ["all", "base", "new"])
def test_subsample_is_coops_rule_after_the_fewshot_draw(pets_root, subsample):
    full = coop.load(str(pets_root), "oxford_pets", num_shots=2, seed=3)
    lists = [[tuple(r) for r in records] for records in (full.train, full.val, full.test)]
    expected = coop_reference.coop_subsample(lists, subsample)
    d = coop.load(str(pets_root), "coop/oxford_pets", num_shots=2, seed=3, subsample=subsample)
    assert [[tuple(r) for r in records] for records in (d.train, d.val, d.test)] == expected
    halves = {"all": NAMES, "base": NAMES[:3], "new": NAMES[3:]}  # ceil(5 / 2) = 3 base
    assert d.class_names == tuple(halves[subsample])


def _variant(root, directory, image_dir, folders, wnids, names, readme=False):
    dataset_dir = root / directory
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "classnames.txt").write_text(
        "".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
    for k, folder in enumerate(folders):
        for i in range(2):
            coop_layout.write_image(dataset_dir / image_dir / folder / f"{i}.jpg", 10 * k + i)
    if readme:
        (dataset_dir / image_dir / "README.txt").write_text("about")


def test_imagenet_a_and_r_are_their_200_class_subsets_named_from_classnames(tmp_path):
    wnids = ["n01", "n02", "n03", "n04", "n05"]
    names = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]
    # Three of the five classes, listed out of order on disk, plus a README.txt.
    _variant(tmp_path, "imagenet-adversarial", "imagenet-a", ["n04", "n02", "n05"], wnids,
             names, readme=True)
    _variant(tmp_path, "imagenet-rendition", "imagenet-r", ["n03", "n01"], wnids, names)
    a = coop.load(str(tmp_path), "coop/imagenet_a", num_shots=16)
    assert a.class_names == ("goldfish", "tiger shark", "hammerhead shark")  # sorted wnids
    assert sorted({(r.label, os.path.basename(os.path.dirname(r.impath))) for r in a.test}) == [
        (0, "n02"), (1, "n04"), (2, "n05")]
    assert a.train == a.test and len(a.test) == 6  # test only; no few-shot draw
    r = coop.load(str(tmp_path), "coop/imagenet_r")
    assert r.class_names == ("tench", "great white shark")


def test_imagenetv2_folders_are_label_numbers(tmp_path):
    wnids, names = ["n01", "n02", "n03"], ["tench", "goldfish", "great white shark"]
    _variant(tmp_path, "imagenetv2", "imagenetv2-matched-frequency-format-val", ["0", "1", "2"],
             wnids, names)
    d = coop.load(str(tmp_path), "coop/imagenetv2")
    assert d.class_names == tuple(names)
    assert sorted({(r.label, os.path.basename(os.path.dirname(r.impath))) for r in d.test}) == [
        (0, "0"), (1, "1"), (2, "2")]


def test_class_specific_context_cannot_move_to_other_classes():
    common = dict(position="end", adapter=None, adapter_params=None, adapter_qstate=None)
    shared = classifier_lib.Trained(class_names=("cat", "dog"), context=jnp.zeros((4, 8)), **common)
    assert shared.for_classes(["car", "bus", "van"]).class_names == ("car", "bus", "van")
    specific = classifier_lib.Trained(class_names=("cat", "dog"), context=jnp.zeros((2, 4, 8)),
                                   **common)
    assert specific.for_classes(("cat", "dog")) is specific
    with pytest.raises(ValueError, match="class-specific context .* 2 training classes"):
        specific.for_classes(["car", "bus"])


_FAST = ["--config.quant.calib_batches=1", "--config.quant.calib_batch_size=8",
         "--config.eval.batch_size=8", "--config.train.batch_size=8",
         "--config.train.num_steps=3", "--config.p4q.n_ctx=4",
         "--config.p4q.adapter_calib_batches=1"]


def _sweep(out, preset, *args):
    """experiments/sweep.py and its main.py jobs, in this process (`main_runner.run_sweep`)."""
    done = main_runner.run_sweep(
        [f"--out={out}", f"--preset={preset}", "--methods=configs/coop_fewshot.py:p4q_w8a8",
         *args])
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _table(text, heading):
    return text[text.index(heading):].split("\n\n")[1].splitlines()


def test_generalization_presets_end_to_end(pets_root, tmp_path, tiny_checkpoint):
    """The three table presets, shortened (one variant, one seed, 2 shots, one target each), on
    generated CoOp layouts with the tiny CLIP: CoOp's recipe + P4Q (SGD with momentum,
    per-epoch schedule, random crops, no feature cache) on the base half, and on ImageNet with
    its export evaluated on other datasets' classes."""
    root, out = pets_root, tmp_path / "sweeps"
    common = [f"--set=data.root={root}", f"--set=model.checkpoint={tiny_checkpoint}",
              "--shots=2", *(f"--set={flag[len('--config.'):]}" for flag in _FAST)]
    _sweep(out, "base_to_new", "--datasets=coop/oxford_pets", "--seeds=2", *common)
    workdir = out / "coop_fewshot_p4q_w8a8/coop/oxford_pets/base/2shots/seed2"
    results = json.loads((workdir / "results.json").read_text())
    assert (results["dataset"], results["num_classes"]) == ("coop/oxford_pets", 3)
    assert [row["method"] for row in results["rows"]] == ["fp_zeroshot", "ptq", "p4q_w8a8"]
    for row in results["rows"]:
        assert row["count"] == 6 and row["new"]["count"] == 4  # 3 base / 2 new classes x 2
        assert row["hm"] == pytest.approx(harmonic := (
            2 * row["top1"] * row["new"]["top1"] / (row["top1"] + row["new"]["top1"])
            if row["top1"] + row["new"]["top1"] else 0.0))
        assert 0 <= harmonic <= 100
    # train_split.json: CoOp's 2-shot draw of seed 2, then the base half.
    split = json.loads((root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    lists = coop_reference.coop_lists(split, "", num_shots=2, seed=2)
    train, val, _ = coop_reference.coop_subsample(
        [lists["train"], lists["val"], lists["test"]], "base")
    written = json.loads((workdir / "train_split.json").read_text())
    assert written["image_dir"] == str(root / "oxford_pets/images")
    assert written["fewshot_source"] == "drawn"
    assert [tuple(x) for x in written["train"]] == train
    assert [tuple(x) for x in written["val"]] == val
    assert not (workdir / "feature_cache").exists()  # random crops are encoded in the step
    text = (out / "results.md").read_text()
    for heading in ("## Base-to-new, coop/oxford_pets", "## Base-to-new, average"):
        header, _, *rows = _table(text, heading)
        assert header == "| method | base | new | H |"
        assert [row.split(" | ")[0] for row in rows] == [
            "| FP zero-shot", "| PTQ w8a8", "| p4q_w8a8"]
    assert (out / "base_to_new.png").read_bytes().startswith(b"\x89PNG")

    # Cross-dataset, then domain generalization on the same ImageNet run (trained once).
    coop_layout.imagenet(root, ["n01", "n02", "n03"], ["tench", "goldfish", "shark"],
                         {"train": 3, "val": 2})
    coop_layout.split_dataset(root, "dtd", "images", "split_zhou_DescribableTextures.json",
                              ["banded", "blotchy", "braided", "bubbly"],
                              {"train": 1, "val": 1, "test": 3})
    _variant(root, "imagenetv2", "imagenetv2-matched-frequency-format-val", ["0", "1", "2"],
             ["n01", "n02", "n03"], ["tench", "goldfish", "shark"])
    _sweep(out, "cross_dataset", "--seeds=1", "--targets=coop/dtd", *common)
    source = out / "coop_fewshot_p4q_w8a8/coop/imagenet/2shots/seed1"
    evaluated = json.loads((source / "transfer/coop_dtd/eval_results.json").read_text())
    assert evaluated["transfer"] is True and evaluated["num_classes"] == 4
    assert evaluated["rows"][0]["count"] == 12
    header, _, *rows = _table((out / "results.md").read_text(), "## Transfer from coop/imagenet")
    assert header == "| method | coop/imagenet | coop/dtd | target average |"
    cells = {row.split(" | ")[0][2:]: row.split(" | ")[1:] for row in rows}
    assert list(cells) == ["FP zero-shot", "PTQ w8a8", "p4q_w8a8"]
    assert cells["PTQ w8a8"][1:] == ["-", "- |"]  # PTQ has no export to transfer
    assert cells["p4q_w8a8"][1] == f"{evaluated['rows'][0]['top1']:.2f} +- 0.00"
    assert (out / "transfer.png").read_bytes().startswith(b"\x89PNG")
    done = _sweep(out, "domain_generalization", "--seeds=1", "--targets=coop/imagenetv2",
                  *common)
    assert done.stderr.count("done before, skipped") == 1  # the ImageNet training run
    header, _, *rows = _table((out / "results.md").read_text(), "## Transfer from coop/imagenet")
    assert header == "| method | coop/imagenet | coop/imagenetv2 | target average |"
    assert [row.split(" | ")[0] for row in rows] == [
        "| FP zero-shot", "| PTQ w8a8", "| p4q_w8a8"]
    assert all(" - " not in row for row in (rows[0], rows[2]))  # every column has a value


def test_a_test_only_dataset_cannot_train(tmp_path):
    config = coop_fewshot.get_config("coop_fp")
    config.data.name, config.data.root = "coop/imagenet_a", str(tmp_path)
    with pytest.raises(preflight.ConfigError,
                       match="a test-only dataset cannot calibrate or train the p4q job"):
        preflight.check(config, tmp_path / "run", mode="p4q")
