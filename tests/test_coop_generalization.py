"""Generalization protocols on CoOp layouts: CoCoOp's base-to-new halves, ImageNet's test-only
variants, and exports evaluated on other classes (cross-dataset transfer)."""

import json
import os

import jax.numpy as jnp
import pytest

from p4q_jax import preflight
from p4q_jax.configs import coop_fewshot
from p4q_jax.data import coop
from p4q_jax.p4q import trained as trained_lib

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
    shared = trained_lib.Trained(class_names=("cat", "dog"), context=jnp.zeros((4, 8)), **common)
    assert shared.for_classes(["car", "bus", "van"]).class_names == ("car", "bus", "van")
    specific = trained_lib.Trained(class_names=("cat", "dog"), context=jnp.zeros((2, 4, 8)),
                                   **common)
    assert specific.for_classes(("cat", "dog")) is specific
    with pytest.raises(ValueError, match="class-specific context .* 2 training classes"):
        specific.for_classes(["car", "bus"])


_FAST = ["--config.quant.calib_batches=1", "--config.quant.calib_batch_size=8",
         "--config.eval.batch_size=8", "--config.train.batch_size=8",
         "--config.train.num_steps=3", "--config.p4q.n_ctx=4",
         "--config.p4q.adapter_calib_batches=1"]


def test_base_to_new_and_transfer_through_main(pets_root, tmp_path, tiny_checkpoint):
    """CoOp's recipe + P4Q (SGD with momentum, per-epoch schedule, random crops, no feature
    cache) on the base half, then its export on another dataset's classes."""
    workdir = tmp_path / "run"
    main_runner.run_main([
        "--config=configs/coop_fewshot.py:p4q_w8a8", "--config.data.name=coop/oxford_pets",
        f"--config.data.root={pets_root}", "--config.data.num_shots=2",
        "--config.data.shot_seed=2", "--config.data.subsample=base",
        f"--config.model.checkpoint={tiny_checkpoint}", *_FAST, f"--workdir={workdir}"],
        mock_examples=None)
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
    split = json.loads((pets_root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    lists = coop_reference.coop_lists(split, "", num_shots=2, seed=2)
    train, val, _ = coop_reference.coop_subsample(
        [lists["train"], lists["val"], lists["test"]], "base")
    written = json.loads((workdir / "train_split.json").read_text())
    assert written["image_dir"] == str(pets_root / "oxford_pets/images")
    assert written["fewshot_source"] == "drawn"
    assert [tuple(x) for x in written["train"]] == train
    assert [tuple(x) for x in written["val"]] == val
    assert not (workdir / "feature_cache").exists()  # random crops are encoded in the step
    # The export evaluates on another dataset (other class names): cross-dataset transfer.
    coop_layout.split_dataset(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json",
                              ["banded", "blotchy", "braided", "bubbly"],
                              {"train": 1, "val": 1, "test": 3})
    main_runner.run_main([
        "--config=configs/coop_fewshot.py:p4q_w8a8", "--mode=eval",
        "--config.data.name=coop/dtd", f"--config.data.root={tmp_path}",
        "--config.eval.batch_size=8", f"--config.model.checkpoint={tiny_checkpoint}",
        f"--workdir={workdir}"], mock_examples=None)
    evaluated = json.loads((workdir / "eval_results.json").read_text())
    assert evaluated["transfer"] is True and evaluated["num_classes"] == 4
    assert evaluated["rows"][0]["count"] == 12


def test_a_test_only_dataset_cannot_train(tmp_path):
    config = coop_fewshot.get_config("coop_fp")
    config.data.name, config.data.root = "coop/imagenet_a", str(tmp_path)
    with pytest.raises(preflight.ConfigError,
                       match="a test-only dataset cannot calibrate or train the p4q job"):
        preflight.check(config, tmp_path / "run", mode="p4q")
