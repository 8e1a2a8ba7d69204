"""CoOp's datasets (`data.coop`) against CoOp's and Dassl's rules, reimplemented here."""

import json
import os
import random

import pytest

from p4q_jax import data
from p4q_jax.data import coop

import coop_layout
import coop_reference

PETS = ["abyssinian", "american_bulldog", "basset_hound"]


@pytest.fixture(name="pets_root")
def _pets_root(tmp_path):
    # Class 1 has 3 training images (fewer than 4 shots); val has 2-6 per class.
    coop_layout.split_dataset(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json",
                              PETS, {"train": [6, 3, 7], "val": [6, 2, 5], "test": 2})
    return tmp_path


def test_split_file_read_as_coop_reads_it(pets_root):
    split = json.loads((pets_root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    d = coop.load(str(pets_root), "coop/oxford_pets")
    image_dir = str(pets_root / "oxford_pets/images")
    assert d.image_dir == image_dir
    for key in ("train", "val", "test"):
        assert [tuple(r) for r in getattr(d, key)] == [
            (os.path.join(image_dir, p), y, c) for p, y, c in split[key]]
    assert d.class_names == ("abyssinian", "american bulldog", "basset hound")
    assert d.fewshot_source is None
    assert d.relative(d.train[0]) == split["train"][0][0]


@pytest.mark.parametrize("num_shots", [1, 2, 4, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fewshot_subsets_equal_dasslss_draw(pets_root, num_shots, seed):
    split = json.loads((pets_root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    expected = coop_reference.coop_lists(split, str(pets_root / "oxford_pets/images"), num_shots, seed)
    d = coop.load(str(pets_root), "oxford_pets", num_shots=num_shots, seed=seed)
    assert [tuple(r) for r in d.train] == expected["train"]
    assert [tuple(r) for r in d.val] == expected["val"]
    assert [tuple(r) for r in d.test] == expected["test"]
    assert d.fewshot_source == "drawn"


def test_seeds_draw_different_subsets(pets_root):
    draws = {tuple(coop.load(str(pets_root), "oxford_pets", num_shots=2, seed=s).train)
             for s in (1, 2, 3)}
    assert len(draws) == 3


def test_fgvc_aircraft_from_its_variant_files(tmp_path):
    variants = ["707-320", "A300B4", "F/A-18"]
    coop_layout.fgvc_aircraft(tmp_path, variants, {"train": 2, "val": 1, "test": 1})
    d = coop.load(str(tmp_path), "fgvc_aircraft", num_shots=1, seed=1)
    assert d.class_names == tuple(variants)
    lines = (tmp_path / "fgvc_aircraft/images_variant_test.txt").read_text().split("\n")
    assert [(os.path.basename(r.impath), r.label, r.classname) for r in d.test] == [
        (line.split(" ")[0] + ".jpg", variants.index(line.split(" ", 1)[1]),
         line.split(" ", 1)[1]) for line in lines if line]
    assert sorted(r.label for r in d.train) == [0, 1, 2]


def test_imagenet_from_class_folders_and_classnames_txt(tmp_path):
    folders = ["n01440764", "n01443537", "n01484850"]
    names = ["tench", "goldfish", "great white shark"]
    coop_layout.imagenet(tmp_path, folders, names, {"train": 3, "val": 2})
    d = coop.load(str(tmp_path), "imagenet", num_shots=2, seed=1)
    assert d.class_names == tuple(names)
    assert d.val == d.test  # CoOp: the val set is the test set
    assert [(r.label, r.classname) for r in d.test] == [
        (y, n) for y, n in enumerate(names) for _ in range(2)]
    # Files in os.listdir order, as Dassl's listdir_nohidden; then the few-shot draw.
    image_dir = tmp_path / "imagenet/images/train"
    full = [(str(image_dir / f / file), y, names[y]) for y, f in enumerate(folders)
            for file in os.listdir(image_dir / f)]
    state = random.getstate()
    random.seed(1)
    expected = coop_reference.dassl_fewshot(full, 2)
    random.setstate(state)
    assert [tuple(r) for r in d.train] == expected


def test_cached_fewshot_pickle_is_used_and_relocated(pets_root):
    split = json.loads((pets_root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    # Written on another machine: its $DATA was /home/someone/data.
    chosen = {"train": split["train"][1::2], "val": split["val"][:3]}
    other = {k: [("/home/someone/data/oxford_pets/images/" + p, y, c) for p, y, c in v]
             for k, v in chosen.items()}
    pkl = pets_root / "oxford_pets/split_fewshot/shot_4-seed_2.pkl"
    coop_layout.fewshot_pickle(str(pkl), other)
    d = coop.load(str(pets_root), "oxford_pets", num_shots=4, seed=2)
    assert d.fewshot_source == str(pkl)
    image_dir = str(pets_root / "oxford_pets/images")
    for key in ("train", "val"):
        assert [tuple(r) for r in getattr(d, key)] == [
            (os.path.join(image_dir, p), y, c) for p, y, c in chosen[key]]


def test_pickle_with_anything_but_datum_is_refused_unrun(pets_root, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle  # pylint: disable=g-import-not-at-top
    pkl = pets_root / "oxford_pets/split_fewshot/shot_1-seed_1.pkl"
    pkl.parent.mkdir()
    pkl.write_bytes(pickle.dumps({"train": [Payload()], "val": []}))
    with pytest.raises(coop.DataError, match=r"shot_1-seed_1.pkl: not a CoOp data pickle.*"
                                             r"refusing to load (posix|os)\.system"):
        coop.load(str(pets_root), "oxford_pets", num_shots=1, seed=1)
    assert not marker.exists()


def test_pickle_from_other_splits_is_refused(pets_root):
    pkl = pets_root / "oxford_pets/split_fewshot/shot_1-seed_1.pkl"
    coop_layout.fewshot_pickle(str(pkl), {"train": [("/x/images/elsewhere.jpg", 0, "abyssinian")],
                                          "val": []})
    with pytest.raises(coop.DataError, match="elsewhere.jpg.*not in this dataset's split files"):
        coop.load(str(pets_root), "oxford_pets", num_shots=1, seed=1)


def test_missing_split_file_names_it_and_the_datasets_md_section(tmp_path):
    (tmp_path / "eurosat/2750").mkdir(parents=True)
    with pytest.raises(coop.DataError) as e:
        coop.load(str(tmp_path), "coop/eurosat")
    assert str(tmp_path / "eurosat/split_zhou_EuroSAT.json") in str(e.value)
    assert "'EuroSAT' section of DATASETS.md" in str(e.value)


def test_missing_images_name_the_first_and_the_count(pets_root):
    images = sorted((pets_root / "oxford_pets/images").rglob("test_*.jpg"))
    for path in images[:2]:
        path.unlink()
    split = json.loads((pets_root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    first = next(p for p, _, _ in split["test"]
                 if (pets_root / "oxford_pets/images" / p) in images[:2])
    with pytest.raises(coop.DataError, match=rf"2 of the 6 test images .* missing on disk; the "
                                             rf"first is .*{first}"):
        coop.load(str(pets_root), "oxford_pets")


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(coop.DataError, match="coop/imagenet, coop/caltech101, .*coop/ucf101"):
        coop.load(str(tmp_path), "coop/imagenet21k")


def test_registry_info_with_both_template_choices(pets_root):
    coop_one = data.get_info("coop/oxford_pets", root=str(pets_root), num_shots=2)
    assert coop_one.class_names == ("abyssinian", "american bulldog", "basset hound")
    assert coop_one.templates == ("a photo of a {}, a type of pet.",)
    ucf = coop.templates("coop/ucf101", "clip")
    assert len(ucf) == 48 and ucf[0] == "a photo of a person {}."
    assert coop.templates("imagenet", "clip") == data.classnames.IMAGENET_TEMPLATES
    assert coop.templates("dtd") == ("{} texture.",)
    with pytest.raises(ValueError, match="needs CoOp's data folder"):
        data.get_info("coop/oxford_pets")


def _rewrite_split(root, change):
    path = root / "oxford_pets/split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    change(split)
    path.write_text(json.dumps(split))
    return path


@pytest.mark.parametrize("label", [10**12, 16])
def test_a_label_beyond_the_lists_is_refused_naming_the_file(pets_root, label):
    """A label of 10**12 was a bare MemoryError (a range of 10**12 labels was built)."""
    path = _rewrite_split(pets_root, lambda split: split["train"][2].__setitem__(1, label))
    with pytest.raises(coop.DataError, match=rf"{path}: train\[2\] has label {label}; "
                                             r"expected labels 0..n-1, n <= the 16 "
                                             r"training entries"):
        coop.load(str(pets_root), "oxford_pets")


def test_one_class_name_per_label_across_the_lists(pets_root):
    def rename_in_test(split):
        split["test"][1][2] = "beagle"
    path = _rewrite_split(pets_root, rename_in_test)
    label = json.loads(path.read_text())["test"][1][1]
    with pytest.raises(coop.DataError, match=rf"{path}: label {label} is named '.*' in train\["
                                             rf"\d+\] and 'beagle' in test\[1\]; expected one "
                                             r"class name per label"):
        coop.load(str(pets_root), "oxford_pets")


def test_two_names_for_one_label_in_train_are_refused(pets_root):
    def rename_in_train(split):
        split["train"][4][2] = "sphynx"
    path = _rewrite_split(pets_root, rename_in_train)
    with pytest.raises(coop.DataError, match=rf"{path}: label \d is named '.*' in train\[\d\] "
                                             r"and 'sphynx' in train\[4\]"):
        coop.load(str(pets_root), "oxford_pets")


@pytest.mark.parametrize("seed", ["1", 1.0, True, None])
def test_seeds_that_are_not_ints_are_refused(pets_root, seed):
    """seed="1" drew another subset than seed=1 (random.Random hashes the str)."""
    with pytest.raises(coop.DataError, match=rf"seed={seed!r}: expected an int"):
        coop.load(str(pets_root), "oxford_pets", num_shots=2, seed=seed)


def test_a_changed_split_file_is_read_again(pets_root):
    """load was memoized by its arguments: a rewritten split file was not seen."""
    before = coop.load(str(pets_root), "oxford_pets")
    _rewrite_split(pets_root, lambda split: split["test"].pop())
    after = coop.load(str(pets_root), "oxford_pets")
    assert len(after.test) == len(before.test) - 1
    assert coop.load(str(pets_root), "oxford_pets") is after  # unchanged: the cached lists


def test_a_split_file_that_appears_is_read(tmp_path):
    with pytest.raises(coop.DataError, match="does not exist"):
        coop.load(str(tmp_path), "oxford_pets")
    coop_layout.split_dataset(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json",
                              PETS, {"train": 2, "val": 1, "test": 1})
    assert len(coop.load(str(tmp_path), "oxford_pets").train) == 6


@pytest.mark.parametrize("content, reason", [
    (b"", "an empty file"),
    (b"<html>404 not found</html>", "not a JPEG, PNG, GIF, BMP or WebP file"),
])
def test_an_image_that_would_not_decode_is_named_with_its_list(pets_root, content, reason):
    split = json.loads((pets_root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    bad = pets_root / "oxford_pets/images" / split["test"][3][0]
    bad.write_bytes(content)
    with pytest.raises(coop.DataError, match=rf"CoOp dataset 'oxford_pets', test list: 1 image "
                                             rf"files cannot be decoded; .*{bad}: {reason}"):
        coop.load(str(pets_root), "oxford_pets")
