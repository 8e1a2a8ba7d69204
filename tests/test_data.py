"""The data layer: registry, class names, TFDS / folder / synthetic pipelines (no network)."""
import collections
import functools
import io
import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from open_clip import zero_shot_metadata
from PIL import Image

from p4q_jax import data
from p4q_jax.clip import transforms
from p4q_jax.data import classnames
from p4q_jax.data import registry
from p4q_jax.configs import base as base_config

_REPO = pathlib.Path(__file__).resolve().parents[1]
_LOW = (0.0 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)
_HIGH = (1.0 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)


def _config(**overrides):
    """The base config's data section (every field, its defaults) with the tests' changes."""
    cfg = base_config.get_config().data
    cfg.update(dict(name="cifar10", shot_seed=0, flip=False, shuffle_buffer=256,
                    synthetic_examples=20))
    cfg.update(overrides)
    return cfg


def _batches(cfg, *, count=None, **kwargs):
    ds = data.create_dataset(cfg, **kwargs)
    if count is not None:
        ds = ds.take(count)
    return list(data.as_numpy_batches(ds))


def _pixels(image):
    """Normalized image -> the uint8 pixels it came from (exact when nothing was resized)."""
    raw = (image * np.asarray(transforms.CLIP_STD) + np.asarray(transforms.CLIP_MEAN)) * 255
    return np.round(raw).astype(np.int64)


def _index_of(image):
    pixel = _pixels(image)[0, 0]
    return int(pixel[0] + 256 * pixel[1])


def _masked_images(batches):
    return [img for b in batches for img, m in zip(b["image"], b["mask"]) if m]


def _masked_indices(batches):
    return [_index_of(img) for img in _masked_images(batches)]


def _indexed_example(features, index, num_classes):
    """Example `index` of the indexed mock: label index % num_classes, pixels encoding index."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = index % 256, index // 256, 7
    example = {"id": str(index), "image": image, "label": index % num_classes}
    if "coarse_label" in features:
        example["coarse_label"] = 0
    return example


def _indexed_mock(num_examples):
    """mock_data whose examples are recognisable and which honours sub-splits (`tfds.even_splits`).

    The default mock ignores the split, so every process would read the same data; this one
    resolves split instructions the way TFDS does, against `num_examples` per split.
    """
    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del read_config, shuffle_files
        infos = tfds.core.SplitDict([
            tfds.core.SplitInfo(name=name, shard_lengths=[num_examples], num_bytes=0)
            for name in ("train", "test")])
        indices = np.concatenate([
            np.arange(part.from_ or 0, num_examples if part.to is None else part.to)
            for part in tfds.core.splits.AbstractSplit.from_spec(split).to_absolute(infos)])
        features = self.info.features
        num_classes = features["label"].num_classes
        serialized = [
            features.serialize_example(_indexed_example(features, i, num_classes)) for i in indices]
        if isinstance(decoders, tfds.decode.PartialDecoding):
            features, decoders = decoders.extract_features(features), decoders.decoders
        ds = tf.data.Dataset.from_tensor_slices(serialized)
        return ds.map(functools.partial(features.deserialize_example, decoders=decoders))

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _fake_processes(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


# --- registry and class names ------------------------------------------------------------------


def test_registry_counts():
    cifar100 = data.get_info("cifar100")
    assert (cifar100.num_classes, len(cifar100.templates)) == (100, 18)
    assert len(set(cifar100.class_names)) == 100
    cifar10 = data.get_info("cifar10")
    assert (cifar10.num_classes, len(cifar10.templates)) == (10, 18)
    imagenet = data.get_info("imagenet2012")
    assert (imagenet.num_classes, len(imagenet.templates)) == (1000, 80)
    # CLIP's curated list repeats two names; everything else is distinct.
    repeated = {n for n, c in collections.Counter(imagenet.class_names).items() if c > 1}
    assert repeated == {"missile", "sunglasses"}
    assert all(t.count("{}") == 1 for t in imagenet.templates + cifar100.templates)


def test_cifar_names_are_the_dataset_label_order():
    # TFDS only learns CIFAR's names from the downloaded archive; the archive's fine labels are
    # alphabetical with underscores, which pins down our list's order independently.
    with_underscores = [n.replace(" ", "_") for n in classnames.CIFAR100_CLASSNAMES]
    assert with_underscores == sorted(with_underscores)
    assert classnames.CIFAR100_CLASSNAMES[83] == "sweet pepper"
    assert classnames.CIFAR10_CLASSNAMES[::9] == ("airplane", "truck")
    label = tfds.builder("cifar100").info.features["label"]
    assert label.num_classes == len(classnames.CIFAR100_CLASSNAMES)


def test_imagenet_lists_match_open_clip():
    info = data.get_info("imagenet2012")
    assert info.class_names == tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert info.templates == tuple(t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)


@pytest.mark.parametrize("name, count, first, template", [
    ("oxford_iiit_pet", 37, "abyssinian", "a photo of a {}, a type of pet."),
    ("oxford_flowers102", 102, "pink primrose", "a photo of a {}, a type of flower."),
    ("food101", 101, "apple pie", "a photo of {}, a type of food."),
    ("caltech101", 102, "accordion", "a photo of a {}."),
    ("dtd", 47, "banded", "{} texture."),
    ("eurosat", 10, "Annual Crop Land", "a centered satellite photo of {}."),
    ("sun397", 397, "abbey", "a photo of a {}."),
    ("cars196", 196, "2000 AM General Hummer SUV", "a photo of a {}."),
])
def test_tfds_class_names_offline(name, count, first, template):
    info = data.get_info(name)
    assert (info.num_classes, info.class_names[0], info.templates) == (count, first, (template,))
    assert all("_" not in n for n in info.class_names)


def test_coop_name_cleaning():
    assert classnames.sun397_names(["/a/apartment_building/outdoor", "/b/bakery/shop"]) == (
        "outdoor apartment building", "shop bakery")
    assert classnames.car_names(["Acura RL Sedan 2012"]) == ("2012 Acura RL Sedan",)
    assert classnames.caltech101_names(["airplanes", "faces_easy", "car_side"]) == (
        "airplane", "centered face", "car side")
    assert classnames.pet_names(["British_Shorthair"]) == ("british shorthair",)


def test_names_unavailable_offline(monkeypatch):
    spec = registry._TfdsSpec(  # pylint: disable=protected-access
        tfds_name="caltech_birds2011", train_split="train", test_split="test",
        templates=classnames.PHOTO_TEMPLATES, clean=classnames.plain_names)
    monkeypatch.setitem(registry._TFDS_DATASETS, "birds", spec)  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="not prepared"):
        data.get_info("birds")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="known: .*cifar100.*synthetic"):
        data.get_info("cifar1000")


def test_eval_only_dataset_has_no_train_split():
    with pytest.raises(ValueError, match="no train split"):
        data.get_info("imagenet_v2").split_name("train")


def test_prompts():
    filled = data.prompts(("cat", "dog"), ("a photo of a {}.", "art of the {}."))
    assert filled == [
        ["a photo of a cat.", "art of the cat."], ["a photo of a dog.", "art of the dog."]]


# --- TFDS pipelines under mock data --------------------------------------------------------------


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_pipeline_shapes_and_range(name, num_classes):
    cfg = _config(name=name)
    with tfds.testing.mock_data(num_examples=10):
        test = _batches(cfg, split="test", batch_size=4, image_size=224, train=False)
        train = _batches(cfg, count=3, split="train", batch_size=4, image_size=224, train=True)
    assert len(test) == 3 and len(train) == 3
    for batch in test + train:
        assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
        assert np.all((batch["label"] >= 0) & (batch["label"] < num_classes))
        assert np.all(batch["image"] >= _LOW - 1e-5) and np.all(batch["image"] <= _HIGH + 1e-5)
    assert sum(b["mask"].sum() for b in test) == 10
    assert all(b["mask"].all() for b in train)
    padding = test[-1]
    assert not padding["mask"][2:].any()
    assert np.all(padding["image"][2:] == 0) and np.all(padding["label"][2:] == 0)


def test_eval_sees_every_example_once():
    with _indexed_mock(13):
        batches = _batches(_config(), split="test", batch_size=4, image_size=32, train=False)
        assert data.num_examples(_config(), split="test") == 13
    assert sorted(_masked_indices(batches)) == list(range(13))
    labels = [label for b in batches for label, m in zip(b["label"], b["mask"]) if m]
    assert labels == [i % 10 for i in _masked_indices(batches)]


@pytest.mark.parametrize("overrides", [
    dict(name="cifar10"),
    dict(name="cifar10", num_shots=3),
    dict(name="synthetic", synthetic_examples=13),
], ids=["tfds", "tfds-few-shot", "synthetic"])
def test_process_shards_are_disjoint_and_cover_the_split(monkeypatch, overrides):
    cfg = _config(**overrides)
    split = "train" if cfg.num_shots else "test"
    shards = []
    with _indexed_mock(60 if cfg.num_shots else 13):
        for index in range(2):
            _fake_processes(monkeypatch, index, 2)
            batches = _batches(cfg, split=split, batch_size=8, image_size=32, train=False)
            assert all(b["image"].shape[0] == 4 for b in batches)
            keys = {_pixels(img).tobytes() for img in _masked_images(batches)}
            shards.append((len(batches), keys))
        total = data.num_examples(cfg, split=split)
    (steps0, first), (steps1, second) = shards
    assert steps0 == steps1  # every process runs the same number of eval steps
    assert not first & second
    assert len(first) + len(second) == total == (30 if cfg.num_shots else 13)


def test_training_batches_are_the_global_batches_split_over_processes(monkeypatch):
    """Any number of processes trains on the same global batches: each process's batch is its
    slice of the one a single process reads (so runs equal across host counts)."""
    with _indexed_mock(40):
        _fake_processes(monkeypatch, 0, 1)
        whole = _batches(_config(), count=6, split="train", batch_size=8, image_size=32,
                         train=True)
        parts = []
        for index in range(2):
            _fake_processes(monkeypatch, index, 2)
            parts.append(_batches(_config(), count=6, split="train", batch_size=8,
                                  image_size=32, train=True))
    for batch, first, second in zip(whole, *parts):
        expected = [_index_of(img) for img in batch["image"]]
        assert [_index_of(img) for img in first["image"]] == expected[:4]
        assert [_index_of(img) for img in second["image"]] == expected[4:]
    assert len({_index_of(img) for b in whole for img in b["image"]}) > 8  # several batches


def test_batch_must_divide_over_processes(monkeypatch):
    _fake_processes(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        data.create_dataset(_config(name="synthetic"), split="test", batch_size=8, image_size=32,
                            train=False)


def _few_shot_epoch(shot_seed):
    cfg = _config(num_shots=3, shot_seed=shot_seed)
    with _indexed_mock(200):
        assert data.num_examples(cfg, split="train") == 30
        batches = _batches(cfg, count=3, split="train", batch_size=10, image_size=32, train=True)
    return _masked_indices(batches)


def test_few_shot_is_k_per_class_and_seeded():
    epoch = _few_shot_epoch(0)
    assert len(set(epoch)) == 30  # one epoch of 3 batches: each chosen example once
    assert collections.Counter(i % 10 for i in epoch) == {c: 3 for c in range(10)}
    assert set(_few_shot_epoch(0)) == set(epoch)
    assert set(_few_shot_epoch(1)) != set(epoch)


def test_not_prepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        data.create_dataset(_config(data_dir=str(tmp_path)), split="test", batch_size=4,
                            image_size=32, train=False)


def test_manual_dir_prepares_imagenet_offline(tmp_path, monkeypatch):
    configs = []
    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "download_and_prepare",
        lambda self, download_config: configs.append(download_config))
    cfg = _config(name="imagenet2012", data_dir=str(tmp_path), manual_dir=str(tmp_path / "tars"))
    with pytest.raises(FileNotFoundError, match="manual_dir"):  # the stub prepared nothing
        data.create_dataset(cfg, split="test", batch_size=4, image_size=32, train=False)
    assert configs and configs[0].manual_dir == str(tmp_path / "tars")
    assert not configs[0].try_download_gcs


# --- synthetic and folder datasets ---------------------------------------------------------------


def test_flip_mirrors_some_images():
    def images(flip):
        cfg = _config(name="synthetic", flip=flip)
        batches = _batches(
            cfg, count=5, split="train", batch_size=8, image_size=32, train=True, seed=3)
        return np.concatenate([b["image"] for b in batches])

    plain, flipped = images(False), images(True)
    mirrored = np.array([np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped, plain)])
    same = np.array([np.array_equal(f, p) for f, p in zip(flipped, plain)])
    assert np.all(mirrored | same)
    assert 0 < mirrored.sum() < len(plain)
    np.testing.assert_array_equal(images(True), flipped)  # flips are seeded


def test_synthetic_dataset():
    info = data.get_info("synthetic", synthetic_classes=12)
    assert info.class_names[:2] == ("airplane", "automobile")
    assert info.class_names[10:] == ("airplane 2", "automobile 2")
    cfg = _config(name="synthetic", synthetic_classes=4, synthetic_examples=10)
    test = _batches(cfg, split="test", batch_size=4, image_size=32, train=False)
    again = _batches(cfg, split="test", batch_size=4, image_size=32, train=False)
    labels = np.concatenate([b["label"][b["mask"]] for b in test])
    assert sorted(collections.Counter(labels).values()) == [2, 2, 3, 3]
    np.testing.assert_array_equal(test[0]["image"], again[0]["image"])
    train = _batches(cfg, split="train", batch_size=4, image_size=32, train=False)
    assert not np.array_equal(train[0]["image"], test[0]["image"])
    assert data.num_examples(cfg, split="train") == 10


def _write_image(path, value, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((20, 30, 3), value, np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def test_folder_dataset_with_splits(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for label, name in enumerate(("big_cat", "dog")):
            for i in range(count):
                mode = ("RGB", "RGBA", "L")[i % 3]
                _write_image(tmp_path / split / name / f"{i}.png", 40 + 100 * label, mode)
    (tmp_path / "test" / "dog" / "notes.txt").write_text("not an image")
    info = data.get_info("folder", folder=str(tmp_path))
    assert info.class_names == ("big cat", "dog")
    assert info.templates == classnames.GENERIC_TEMPLATES
    cfg = _config(name="folder", folder=str(tmp_path))
    assert data.num_examples(cfg, split="train") == 6
    batches = _batches(cfg, split="test", batch_size=3, image_size=32, train=False)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask]
    values = _pixels(np.concatenate([b["image"] for b in batches]))[mask][:, 5, 5, 0]
    assert sorted(labels) == [0, 0, 1, 1]
    np.testing.assert_array_equal(values, 40 + 100 * labels)


def test_folder_without_splits_warns_and_serves_both(tmp_path):
    for name in ("cat", "dog"):
        _write_image(tmp_path / name / "a.jpg", 128)
    with pytest.warns(UserWarning, match="no 'train' and 'test' sub-folders"):
        cfg = _config(name="folder", folder=str(tmp_path))
        assert data.num_examples(cfg, split="train") == data.num_examples(cfg, split="test") == 2


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.get_info("folder", folder=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs the image folder"):
        data.get_info("folder")


def _two_class_folder(root):
    """root/{train,test}/{cat,dog}/0.jpg: a valid folder dataset to break in one place."""
    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            _write_image(root / split / name / "0.jpg", 60 + 100 * label)


def _noise_jpeg(size):
    """JPEG bytes of random pixels (so the file is larger than the end-marker search's tail)."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def test_folder_names_every_file_that_would_not_decode(tmp_path):
    """Without the up-front check each of these stops tf.data with an error naming no file."""
    _two_class_folder(tmp_path)
    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(png, "PNG")
    tiff = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiff, "TIFF")
    bad = {
        "train/cat/text.jpg": (b"<!DOCTYPE html><html>not found</html>", "not a JPEG, PNG"),
        "train/dog/empty.png": (b"", "an empty file"),
        "train/dog/small_cut.jpg": (_noise_jpeg(64)[:1500], "truncated"),
        "test/cat/large_cut.jpg": (_noise_jpeg(256)[:20000], "truncated"),
        "test/dog/cut.png": (png.getvalue()[:-30], "truncated"),
        "test/dog/tiff.jpg": (tiff.getvalue(), "not a JPEG, PNG"),
        "test/dog/header_cut.jpg": (_noise_jpeg(64)[:100], "a JPEG whose header is cut short"),
    }
    for name, (content, _) in bad.items():
        (tmp_path / name).write_bytes(content)
    cfg = _config(name="folder", folder=str(tmp_path))
    with pytest.raises(ValueError, match="7 image files cannot be decoded") as error:
        data.create_dataset(cfg, split="train", batch_size=2, image_size=32, train=True)
    for name, (_, reason) in bad.items():
        assert f"{tmp_path / name}: {reason}" in str(error.value)
    assert "0.jpg" not in str(error.value)
    for name in bad:
        (tmp_path / name).unlink()
    assert data.num_examples(cfg, split="train") == 2  # a fixed folder is checked anew


def test_folder_reads_valid_images_of_every_format(tmp_path):
    _two_class_folder(tmp_path)
    cat, dog = tmp_path / "train" / "cat", tmp_path / "train" / "dog"
    image = Image.fromarray(np.full((24, 24, 3), 90, np.uint8))
    image.save(cat / "a.webp")
    image.save(cat / "b.gif")
    image.save(cat / "c.bmp")
    image.convert("CMYK").save(cat / "d.jpeg")
    image.save(dog / "e.jpg", progressive=True)
    # A phone's motion photo: a complete JPEG with other data (no end marker) appended.
    (dog / "f.jpg").write_bytes(_noise_jpeg(32) + bytes(range(0xFF)) * 40)
    (dog / "README.txt").write_text("notes")
    (dog / "._e.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: skipped
    (dog / "scan.tif").write_bytes(b"II*\x00")
    cfg = _config(name="folder", folder=str(tmp_path))
    with pytest.warns(UserWarning, match=r"1 files are skipped .*scan\.tif") as caught:
        assert data.num_examples(cfg, split="train") == 8
        batches = _batches(cfg, split="train", batch_size=8, image_size=32, train=False)
    assert not any("README" in str(w.message) for w in caught)
    assert np.concatenate([b["mask"] for b in batches]).sum() == 8


@pytest.mark.parametrize("break_it, named", [
    (lambda root: (root / "train" / "dog" / "0.jpg").unlink(), "train/dog"),
    (lambda root: (root / "train" / "dog" / "0.jpg").rename(root / "train" / "dog" / "0.txt"),
     "train/dog"),
    (lambda root: _write_image(root / "test" / "fox" / "0.jpg", 7), "train/fox (missing)"),
], ids=["empty", "no-image-files", "only-in-test"])
def test_folder_class_without_training_images_is_refused(tmp_path, break_it, named):
    """Such a class still gets a label and a prompt, but the model never sees an image of it."""
    _two_class_folder(tmp_path)
    break_it(tmp_path)
    cfg = _config(name="folder", folder=str(tmp_path))
    with pytest.raises(ValueError, match="1 of .* classes have no training images") as error:
        data.num_examples(cfg, split="test")
    assert str(tmp_path / named) in str(error.value)


def test_folder_class_without_test_images_warns(tmp_path):
    _two_class_folder(tmp_path)
    (tmp_path / "test" / "dog" / "0.jpg").unlink()
    cfg = _config(name="folder", folder=str(tmp_path))
    with pytest.warns(UserWarning, match="1 of 2 classes have no test images") as caught:
        assert data.num_examples(cfg, split="test") == 1
    assert any(str(tmp_path / "test" / "dog") in str(w.message) for w in caught)


@pytest.mark.parametrize("layout", ["cat/0.jpg", "train/cat/0.jpg"])
def test_single_class_folder_is_refused(tmp_path, layout):
    """One class "trains" to 100% accuracy with loss 0."""
    _write_image(tmp_path / layout, 50)
    if layout.startswith("train"):
        (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"single class sub-folder \('cat'\).*at least 2 classes"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-split layout's warning
            data.get_info("folder", folder=str(tmp_path))


@pytest.mark.parametrize("augment", ["flip", "coop"])
def test_a_resumed_training_stream_equals_the_straight_one(augment):
    cfg = _config(name="synthetic", flip=True, augment=augment)
    kwargs = dict(split="train", batch_size=8, image_size=32, train=True, seed=3)
    straight = _batches(cfg, count=6, **kwargs)
    resumed = _batches(cfg, count=3, skip_batches=3, **kwargs)
    for a, b in zip(straight[3:], resumed):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_coop_augmentation_gives_new_random_crops_every_epoch():
    cfg = _config(name="synthetic", synthetic_examples=8, augment="coop", shuffle_buffer=1)
    kwargs = dict(split="train", batch_size=8, image_size=32, seed=0)
    first, second = _batches(cfg, count=2, train=True, **kwargs)
    (center,) = _batches(cfg, train=False, **kwargs)
    np.testing.assert_array_equal(first["label"], second["label"])  # same images, in order
    assert not np.allclose(first["image"], second["image"])
    assert not np.allclose(first["image"], center["image"])
    with pytest.raises(ValueError, match=r"data.augment='crop': expected one of \['flip', 'coop'\]"):
        _batches(_config(name="synthetic", augment="crop"), **kwargs, train=True)


def test_fixed_class_names_match_the_tfds_labels():
    """The registry's fixed class-name lists (read without TensorFlow) have as many names as
    the TFDS builders' labels (read from the builders' metadata, no data needed)."""
    from p4q_jax.data import shapes_tfds  # noqa: F401  pylint: disable=g-import-not-at-top
    fixed = {name: spec for name, spec in registry._TFDS_DATASETS.items()  # pylint: disable=protected-access
             if spec.class_names is not None}
    assert {"shapes", "shapes_warm", "cifar10", "cifar100", "imagenet2012"} <= set(fixed)
    for name, spec in fixed.items():
        label = tfds.builder(spec.tfds_name).info.features["label"]
        assert label.num_classes == len(spec.class_names), name


def test_benchmarks_and_class_names_need_no_tensorflow():
    """Where TensorFlow is absent (an accelerator image), the benchmarks import and the
    registry answers for fixed class names; the input pipeline is what needs TensorFlow."""
    for benchmark in ("encode", "ptq", "train_step"):  # each defines its own flags
        code = ("import sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = "
                f"None; sys.path.insert(0, 'benchmarks'); import {benchmark}; "
                "from p4q_jax import data; print(data.get_info('cifar100').num_classes, "
                "data.get_info('shapes_warm').num_classes)")
        out = subprocess.run([sys.executable, "-c", code], cwd=str(_REPO), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, (benchmark, out.stderr[-2000:])
        assert out.stdout.split() == ["100", "40"]


def test_a_validation_carve_holds_out_part_of_the_training_split():
    """`data.validation=P`: "train" is the training split less its first P%, "test" that P%
    (TFDS slicing), so hyper-parameters are chosen without the test split."""
    config = base_config.get_config().data
    config.name, config.validation = "cifar10", 10
    info = registry.info_from_config(config)
    assert (info.split_name("train"), info.split_name("test")) == ("train[10%:]", "train[:10%]")
    for name in ("synthetic", "oxford_flowers102"):  # no TFDS split; two splits joined
        config = base_config.get_config().data
        config.name, config.validation = name, 10
        with pytest.raises(ValueError, match="data.validation=10: .* no single TFDS training"):
            registry.info_from_config(config)


def _png_with_damaged_data():
    """A PNG whose compressed pixel data is overwritten in the middle: its header and IEND
    are intact, and tf.io.decode_image fails on it ("Invalid PNG data") naming no file."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        png, "PNG")
    content = bytearray(png.getvalue())
    content[len(content) // 3: len(content) // 3 + 200] = b"\x55" * 200
    return bytes(content)


def test_folder_names_a_png_with_damaged_data(tmp_path):
    _two_class_folder(tmp_path)
    damaged = tmp_path / "test" / "dog" / "damaged.png"
    damaged.write_bytes(_png_with_damaged_data())
    with pytest.raises(tf.errors.InvalidArgumentError):  # what the pipeline alone would say
        tf.io.decode_image(damaged.read_bytes())
    cfg = _config(name="folder", folder=str(tmp_path))
    with pytest.raises(ValueError, match=rf"1 image files cannot be decoded; .*{damaged}: its "
                                         r"PNG chunk 'IDAT' at byte \d+ is damaged"):
        data.num_examples(cfg, split="train")


def test_folder_dangling_symlinks_are_named_and_not_counted(tmp_path):
    """A link to a file or class folder that is gone is neither an image nor a class."""
    _two_class_folder(tmp_path)
    (tmp_path / "train" / "cat" / "1.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "train" / "fox").symlink_to(tmp_path / "gone")
    cfg = _config(name="folder", folder=str(tmp_path))
    with pytest.warns(UserWarning, match=r"2 dangling symbolic links .* skipped") as caught:
        assert data.get_info("folder", folder=str(tmp_path)).class_names == ("cat", "dog")
        assert data.num_examples(cfg, split="train") == 2
    message = " ".join(str(w.message) for w in caught)
    assert str(tmp_path / "train" / "cat" / "1.jpg") in message
    assert str(tmp_path / "train" / "fox") in message


def test_one_class_and_a_dangling_symlink_is_refused_naming_the_link(tmp_path):
    _write_image(tmp_path / "cat" / "0.jpg", 50)
    (tmp_path / "dog").symlink_to(tmp_path / "gone")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-split layout's warning
        with pytest.raises(ValueError, match=r"single class sub-folder \('cat'\) \(dangling "
                                             rf"symbolic links: {tmp_path / 'dog'}\)"):
            data.get_info("folder", folder=str(tmp_path))
