"""CLIP's evaluation preprocessing: bicubic short-side resize, center crop, CLIP normalization.

`preprocess` is the reference: the same PIL operations, in the same order, as
`open_clip.image_transform(size, is_train=False)` (torchvision on PIL), so a pretrained CLIP sees
exactly the pixels it was evaluated with. `preprocess_tf` is the tf.data counterpart for input
pipelines (no Python per image); it repeats PIL's two rounded resize passes, so it agrees with
`preprocess` up to rare one- or two-level rounding flips.
"""
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Array shape tails PIL reads as gray (L), RGB and RGBA.
_ARRAY_CHANNELS = ((), (3,), (4,))


def _resized_shape(height, width, size):
    """(height, width) after scaling the short side to `size`, rounded as torchvision does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _crop_offsets(height, width, size):
    """(top, left) of the centered square crop, rounded half to even as torchvision does."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _to_pil(image):
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL.Image or a numpy array, got {type(image).__name__}.")
    if image.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 in [0, 255], got dtype {image.dtype}.")
    if image.ndim not in (2, 3) or image.shape[2:] not in _ARRAY_CHANNELS:
        raise ValueError(
            f"image array must be [H, W] (gray), [H, W, 3] (RGB) or [H, W, 4] (RGBA), got shape "
            f"{image.shape}.")
    return Image.fromarray(image)


def normalize(pixels):
    """uint8 [..., 3] -> float32 CLIP-normalized, in torchvision's ToTensor + Normalize order."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess(image, *, size=224):
    """CLIP-preprocesses one image on the host.

    Args:
        image: a PIL image of any mode, or a uint8 array [H, W], [H, W, 3] or [H, W, 4].
        size: output side in pixels.

    Returns:
        float32 [size, size, 3], CLIP-normalized. Equal to `open_clip.image_transform(size,
        is_train=False)`: resize and crop in the input's own mode, then RGB, as there.
    """
    image = _to_pil(image)
    height, width = image.height, image.width
    new_shape = _resized_shape(height, width, size)
    if new_shape != (height, width):
        image = image.resize(new_shape[::-1], Image.Resampling.BICUBIC)
    top, left = _crop_offsets(*new_shape, size)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    return normalize(np.asarray(image))


def preprocess_tf(image, *, size=224):
    """CLIP-preprocesses one image inside a tf.data pipeline; a close match to `preprocess`.

    Same geometry as `preprocess` (torchvision's resize size and crop rounding). PIL resizes in two
    separable passes, width then height, each rounded and clipped to uint8; this does the same with
    `tf.image.resize(method="bicubic", antialias=True)` (PIL's a = -0.5 cubic, support widened when
    shrinking). One 2-D float resize instead differs by up to 22/255 on noisy 32 px images, because
    PIL clips the overshoot of its first pass.

    It agrees with `preprocess` within two intensity levels: the differences are single
    pixels whose rounding flips within a pass (docs/results.md, "Fidelity").

    Args:
        image: uint8 tensor [H, W, 3].
        size: output side in pixels.

    Returns:
        float32 tensor [size, size, 3], CLIP-normalized.
    """
    # Imported here so that the `clip` package does not need tensorflow.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"image must be a uint8 tensor, got {image.dtype.name}.")
    if image.shape.rank != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape [H, W, 3], got {image.shape}.")
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    # int(size * long / short) in float64, exactly as torchvision computes it.
    new_long = tf.cast(
        tf.floor(tf.cast(size * long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
    portrait = width <= height
    new_height = tf.where(portrait, new_long, size)
    new_width = tf.where(portrait, size, new_long)

    def resize_pass(pixels, shape):
        resized = tf.image.resize(pixels, shape, method="bicubic", antialias=True)
        return tf.round(tf.clip_by_value(resized, 0.0, 255.0))

    pixels = tf.cast(image, tf.float32)
    pixels = tf.cond(
        tf.equal(new_width, width), lambda: pixels,
        lambda: resize_pass(pixels, tf.stack([height, new_width])))
    pixels = tf.cond(
        tf.equal(new_height, height), lambda: pixels,
        lambda: resize_pass(pixels, tf.stack([new_height, new_width])))
    # tf.round is round-half-even, like Python's round in torchvision's center_crop.
    top = tf.cast(tf.round(tf.cast(new_height - size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_width - size, tf.float64) / 2.0), tf.int32)
    pixels = tf.ensure_shape(pixels[top:top + size, left:left + size], (size, size, 3))
    return (pixels / 255.0 - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


def random_resized_crop_tf(image, *, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """CoOp's training view of a uint8 image [H, W, 3] in tf.data: a random crop resized to
    [size, size] (bicubic) and CLIP-normalized, as torchvision's `RandomResizedCrop(size,
    scale=(0.08, 1), interpolation=BICUBIC)` that Dassl's "random_resized_crop" applies.

    The box comes from `tf.image.stateless_sample_distorted_bounding_box`: 10 tries for an
    area fraction in `scale` and an aspect ratio in `ratio`, as torchvision. Two differences,
    documented rather than hidden: the aspect ratio is drawn uniformly (torchvision: uniform
    in its log), and when no try fits the whole image is used (torchvision: a center crop of
    the clamped ratio). Deterministic in `seed` (a [2] int tensor), so the stream of views is
    the same on every run and after a resume.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.cast(tf.slice(image, begin, extent), tf.float32)
    resized = tf.image.resize(crop, (size, size), method="bicubic", antialias=True)
    pixels = tf.ensure_shape(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), (size, size, 3))
    return (pixels / 255.0 - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)
