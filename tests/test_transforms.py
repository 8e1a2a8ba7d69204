"""CLIP preprocessing: the PIL version against open_clip's own transform, the tf.data version
against the PIL version."""
import pathlib
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import tensorflow as tf
from PIL import Image

from p4q_jax.clip import transforms

_RNG = np.random.default_rng(0)


def _noise(height, width, channels=3):
    return _RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    planes = (255 * x / width, 255 * y / height, 128 + 127 * np.sin(x / 9.0 + y / 13.0))
    return np.stack(planes, -1).astype(np.uint8)


def _checkerboard(height, width, square=8):
    y, x = np.mgrid[0:height, 0:width]
    on = ((x // square + y // square) % 2 * 255).astype(np.uint8)
    return np.stack([on, 255 - on, on // 2], -1)


def _open_clip(image, size):
    return open_clip.image_transform(size, is_train=False)(image).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("height, width, size", [
    (375, 500, 224),  # landscape, shrink
    (500, 375, 224),  # portrait, shrink
    (20, 30, 224),  # smaller than the output: enlarge
    (32, 32, 224),  # CIFAR
    (224, 297, 224),  # no resize; crop offset 36.5 rounds half to even
    (224, 224, 224),  # nothing to do but normalize
    (333, 1000, 336),
    (77, 41, 32),
])
def test_matches_open_clip(height, width, size):
    image = _noise(height, width)
    ours = transforms.preprocess(image, size=size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _open_clip(Image.fromarray(image), size), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(transforms.preprocess(Image.fromarray(image), size=size), ours)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_other_modes_match_open_clip(mode):
    pixels = _noise(90, 140, 4)
    image = Image.fromarray(pixels).convert(mode) if mode != "RGBA" else Image.fromarray(pixels)
    np.testing.assert_allclose(
        transforms.preprocess(image, size=64), _open_clip(image, 64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(90, 140), (90, 140, 4)])
def test_gray_and_rgba_arrays(shape):
    pixels = _RNG.integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_allclose(
        transforms.preprocess(pixels, size=64), _open_clip(Image.fromarray(pixels), 64),
        atol=1e-6, rtol=0)


@pytest.mark.parametrize("image, size", [
    (_noise(32, 32), 224),
    (_gradient(32, 32), 224),
    (_noise(375, 500), 224),
    (_noise(500, 375), 224),
    (_gradient(480, 640), 224),
    (_checkerboard(480, 640), 224),
    (_noise(100, 80), 224),
    (_noise(32, 32), 336),
    (_noise(224, 300), 224),
])
def test_tf_close_to_pil(image, size):
    """Within the tolerance documented in `preprocess_tf`: at most 2 intensity levels anywhere."""
    ours = transforms.preprocess(image, size=size)
    theirs = transforms.preprocess_tf(tf.constant(image), size=size).numpy()
    assert theirs.shape == (size, size, 3) and theirs.dtype == np.float32
    difference = np.abs(theirs - ours)
    assert difference.max() <= 0.031
    assert difference.mean() <= 3e-4


def test_tf_inside_a_dataset_with_unknown_shapes():
    images = [_noise(40, 60), _noise(61, 33)]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec((None, None, 3), tf.uint8))
    out = list(ds.map(lambda image: transforms.preprocess_tf(image, size=32)).as_numpy_iterator())
    for image, result in zip(images, out):
        np.testing.assert_allclose(result, transforms.preprocess(image, size=32), atol=0.031)


@pytest.mark.parametrize("image, error, match", [
    (np.zeros((4, 4, 3), np.float32), ValueError, "uint8"),
    (np.zeros((2, 4, 4, 3), np.uint8), ValueError, "shape"),
    (np.zeros((4,), np.uint8), ValueError, "shape"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, "shape"),
    ([[0, 1], [2, 3]], TypeError, "PIL.Image or a numpy array"),
])
def test_bad_input(image, error, match):
    with pytest.raises(error, match=match):
        transforms.preprocess(image)


@pytest.mark.parametrize("image, match", [
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((4, 4), np.uint8), "shape"),
    (np.zeros((4, 4, 4), np.uint8), "shape"),
])
def test_tf_bad_input(image, match):
    with pytest.raises(ValueError, match=match):
        transforms.preprocess_tf(tf.constant(image))


def test_module_does_not_import_tensorflow():
    path = pathlib.Path(transforms.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('transforms', {str(path)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'tensorflow' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_resized_crop_draws_torchvision_boxes():
    """Each crop's box, read back from a coordinate-coded image, has an area fraction in
    [0.08, 1] and an aspect ratio in [3/4, 4/3] (torchvision's RandomResizedCrop ranges)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    height, width = 120, 160
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([cols * 255 // (width - 1), rows * 255 // (height - 1),
                      np.zeros_like(rows)], -1).astype(np.uint8)
    areas, ratios = [], []
    for seed in range(60):
        out = transforms.random_resized_crop_tf(
            tf.constant(image), size=32, seed=tf.constant([seed, 7], tf.int64)).numpy()
        pixels = (out * np.asarray(transforms.CLIP_STD) + np.asarray(transforms.CLIP_MEAN)) * 255
        # Column/row coordinates at the output's centre lines span the box (bicubic overshoot
        # at the edges is clipped off by the 2-pixel margin).
        box_w = (pixels[16, 29, 0] - pixels[16, 2, 0]) * 32 / 27 / 255 * (width - 1)
        box_h = (pixels[29, 16, 1] - pixels[2, 16, 1]) * 32 / 27 / 255 * (height - 1)
        areas.append(box_w * box_h / (height * width))
        ratios.append(box_w / box_h)
    assert 0.08 * 0.85 <= min(areas) and max(areas) <= 1.05
    assert 0.75 * 0.9 <= min(ratios) and max(ratios) <= 4 / 3 * 1.1
    assert max(areas) - min(areas) > 0.5  # the crops really vary
