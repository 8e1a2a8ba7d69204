"""The rendered shapes dataset: renderer, captions, the TFDS builder and the pipeline (offline)."""
import re

import numpy as np
import pytest

from p4q_jax import data
from p4q_jax.clip import transforms
from p4q_jax.configs import base as base_config
from p4q_jax.data import shapes


def _class_parts(label):
    colour, shape = shapes.CLASS_NAMES[label].split(" ")
    return colour, shape


def test_render_is_a_function_of_the_seed():
    labels = shapes.balanced_labels(50, seed=3)
    a, caps_a = shapes.render(labels, seed=7)
    b, caps_b = shapes.render(labels, seed=7)
    c, _ = shapes.render(labels, seed=8)
    np.testing.assert_array_equal(a, b)
    assert caps_a == caps_b
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert np.mean(a != c) > 0.5


def test_balanced_labels_cover_every_class_equally():
    counts = np.bincount(shapes.balanced_labels(40 * 7 + 3, seed=0), minlength=40)
    assert len(shapes.CLASS_NAMES) == 40 and counts.min() == 7 and counts.max() == 8


def test_shape_pixels_have_the_class_colour_and_captions_name_the_class():
    labels = np.arange(40).repeat(8)
    images, captions = shapes.render(labels, seed=0)
    palette = np.array(list(shapes.COLOURS.values()), np.float64)
    means = []
    for image, label, caption in zip(images.astype(np.float64), labels, captions):
        colour, shape = _class_parts(label)
        # The grey background has equal channels; the shape's pixels are the saturated ones.
        chroma = image.max(-1) - image.min(-1)
        shape_pixels = image[chroma > 80]
        assert len(shape_pixels) >= 8, caption
        means.append(shape_pixels.mean(0))
        nearest = np.argmin(np.linalg.norm(palette - means[-1], axis=-1))
        assert list(shapes.COLOURS)[nearest] == colour, caption
        assert re.search(rf"\b{colour} {shape}\b", caption), caption
    # Per class, the jitter (std 12.5 per channel) averages out over its 8 images.
    per_class = np.stack(means).reshape(40, 8, 3).mean(1)
    want = [shapes.COLOURS[_class_parts(label)[0]] for label in range(40)]
    assert np.abs(per_class - want).max() < 20


def test_shapes_differ_in_what_they_cover():
    """A ring is hollow; a circle covers more of its bounding box than a cross or a triangle."""
    labels = np.array([shapes.SHAPES.index(s) for s in shapes.SHAPES]).repeat(40)  # red ones
    images, captions = shapes.render(labels, seed=1)
    chroma = images.astype(np.int64).max(-1) - images.astype(np.int64).min(-1)
    fill = {}
    for name, mask in zip(np.repeat(shapes.SHAPES, 40), chroma > 80):
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill.setdefault(name, []).append(mask.sum() / box)
    fill = {name: np.mean(v) for name, v in fill.items()}
    assert fill["square"] > 0.9 and 0.7 < fill["circle"] < 0.85
    assert fill["ring"] < fill["circle"] and fill["triangle"] < 0.6 and fill["cross"] < 0.6


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="labels"):
        shapes.render([0, 40], seed=0)


def test_warm_light_is_the_same_scene_under_a_warm_gain():
    labels = shapes.balanced_labels(80, seed=3)
    neutral, captions = shapes.render(labels, seed=7)
    warm, warm_captions = shapes.render(labels, seed=7, light="warm")
    assert warm_captions == captions  # the same scenes
    # The red gain is 1 at every strength: that channel is bit for bit the neutral one.
    np.testing.assert_array_equal(warm[..., 0], neutral[..., 0])
    # Blue is scaled by 1 - s * 0.4 with s in [0.5, 1] (before the noise): 0.6 to 0.8 on average.
    ratio = warm[..., 2].astype(float).mean((1, 2)) / neutral[..., 2].astype(float).mean((1, 2))
    assert np.all((ratio > 0.55) & (ratio < 0.85)) and ratio.std() > 0.02  # per-image strength
    assert np.all(warm[..., 2].astype(int) <= neutral[..., 2].astype(int) + 1)
    with pytest.raises(ValueError, match="light must be one of"):
        shapes.render(labels, seed=7, light="blue")


def test_registry_has_the_warm_shapes_with_the_same_vocabulary():
    info = data.get_info("shapes_warm")
    assert info.class_names == shapes.CLASS_NAMES and info.templates == shapes.TEMPLATES
    assert info.tfds_name == "p4q_shapes_warm" and info.generated


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_registry_has_shapes_with_its_names_and_templates():
    info = data.get_info("shapes")
    assert info.class_names == shapes.CLASS_NAMES and info.templates == shapes.TEMPLATES
    assert info.num_classes == 40 and info.generated


@pytest.mark.parametrize("name,light", [("shapes", "neutral"), ("shapes_warm", "warm")])
def test_tfds_pipeline_serves_the_rendered_splits(shapes_dir, name, light):
    """Prepared on first read (offline), then read like any TFDS dataset."""
    cfg = base_config.get_config().data
    cfg.update(dict(name=name, data_dir=str(shapes_dir), shot_seed=0, flip=False,
                    shuffle_buffer=16))
    assert data.num_examples(cfg, split="train") == 4000
    assert data.num_examples(cfg, split="test") == 1600
    batches = list(data.as_numpy_batches(data.create_dataset(
        cfg, split="test", batch_size=500, image_size=32, train=False)))
    keep = np.concatenate([b["mask"] for b in batches]).astype(bool)  # the last batch is padded
    images = np.concatenate([b["image"] for b in batches])[keep]
    labels = np.concatenate([b["label"] for b in batches])[keep]
    want_images, want_labels, _ = shapes.split_examples("test", light)
    # TFDS stores examples in its own (hashed) order: match them up by their pixels.
    pixels = np.round((images * transforms.CLIP_STD + np.asarray(transforms.CLIP_MEAN)) * 255)
    got = sorted(zip((p.astype(np.uint8).tobytes() for p in pixels), labels.tolist()))
    want = sorted(zip((p.tobytes() for p in want_images), want_labels.tolist()))
    assert got == want
    train_images, _, _ = shapes.split_examples("train", light)
    test_set = {img.tobytes() for img in want_images}
    assert not any(img.tobytes() in test_set for img in train_images)
