"""Shapes: a procedurally rendered image-text dataset for the offline demo (no download).

Each image is one coloured shape on a grey background. The class is the (colour, shape) pair,
e.g. "red triangle" (40 classes); size, position, background brightness, colour jitter and pixel
noise vary within a class, and a caption names them all ("a small red triangle in the top left
on a dark background."), so a CLIP pretrained on (image, caption) pairs learns colour and shape
as words it can be prompted with. Everything is a deterministic function of a seed.

`shapes_tfds.ShapesBuilder` serves it as the TFDS dataset "p4q_shapes" (train and test splits,
generated on this machine the first time it is read; nothing is downloaded). This module needs
only numpy (no TensorFlow). The pretraining stream
(`experiments/tiny_clip/`) draws from seeds disjoint from both splits.

`shapes_tfds.WarmShapesBuilder` ("p4q_shapes_warm") is the demo's downstream task: the same scenes (same
seeds, so the same shapes, positions and noise) photographed under warm, tungsten-like light, an
illuminant the pretraining stream never shows: each image's RGB is scaled by
`1 - s * (1 - WARM_GAIN)` with a per-image strength `s` in [0.5, 1] before the sensor noise, so a
"blue" reads darker and greener and a "yellow" turns orange. The class vocabulary and prompts are
unchanged. The pretrained tiny CLIP's zero-shot accuracy falls far on it (docs/results.md,
"The demo"); prompts and an adapter trained on its train split win part of that back, as on a
real downstream dataset.
"""
import numpy as np

IMAGE_SIZE = 32
COLOURS = {  # neighbouring hues are close, so colour needs more than a few bits to tell apart
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (225, 215, 40),
    "green": (40, 170, 60),
    "teal": (30, 170, 170),
    "blue": (45, 85, 220),
    "purple": (140, 60, 200),
    "pink": (235, 100, 180),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
SIZES = {"small": (3.0, 5.5), "large": (7.0, 11.0)}  # shape radius in pixels
BACKGROUNDS = {"dark": (20, 80), "light": (150, 210)}  # grey level
_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
LIGHTS = ("neutral", "warm")
WARM_GAIN = (1.0, 0.85, 0.6)  # RGB gain of the warm light at full strength (tungsten-like)
WARM_STRENGTH = (0.5, 1.0)  # per-image strength range
_COLOUR_JITTER = 25.0
_NOISE_STD = 12.0

CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)

# Zero-shot prompt ensemble (the registry's templates for "shapes").
TEMPLATES = (
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
)

# Pretraining caption forms; each names the class and any subset of the nuisance attributes.
_CAPTIONS = (
    "a {size} {colour} {shape} {where} on a {bg} background.",
    "a {colour} {shape} {where}.",
    "a {size} {colour} {shape}.",
    "a {colour} {shape} on a {bg} background.",
    "a photo of a {colour} {shape}.",
    "a drawing of a {size} {colour} {shape} {where}.",
    "{where}, a {colour} {shape}.",
    "a {colour} {shape}.",
)


def _where(row, col):
    if (row, col) == (1, 1):
        return "in the centre"
    if row == 1:
        return f"on the {_COLS[col]}"
    if col == 1:
        return f"at the {_ROWS[row]}"
    return f"in the {_ROWS[row]} {_COLS[col]}"


def _masks(shape_ids, radius, cx, cy):
    """Boolean [n, H, W]: which pixels each example's shape covers."""
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    r = radius[:, None, None]
    dist = np.hypot(dx, dy)
    masks = {
        "circle": dist <= r,
        "square": np.maximum(abs(dx), abs(dy)) <= 0.8 * r,
        "triangle": (dy <= 0.7 * r) & (abs(dx) <= (dy + r) * 0.6),
        "cross": ((abs(dx) <= 0.3 * r) & (abs(dy) <= r)) | ((abs(dy) <= 0.3 * r) & (abs(dx) <= r)),
        "ring": (dist <= r) & (dist >= 0.55 * r),
    }
    stacked = np.stack([masks[name] for name in SHAPES])  # [S, n, H, W]
    return stacked[shape_ids, np.arange(len(shape_ids))]


def render(labels, *, seed, light="neutral"):
    """Images and captions for the given class labels.

    Args:
        labels: int [n], indices into `CLASS_NAMES`.
        seed: everything else (size, position, background, jitter, noise, caption form, light
            strength) is drawn from `np.random.default_rng(seed)` (an int or a sequence of ints).
        light: "neutral" (the pretraining light) or "warm" (see the module docstring). The same
            seed renders the same scene under either; "neutral" draws nothing more.

    Returns:
        (images uint8 [n, 32, 32, 3], captions: list of n strings).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size and not (
            0 <= labels.min() and labels.max() < len(CLASS_NAMES)):
        raise ValueError(f"labels must be a 1-D array of indices below {len(CLASS_NAMES)}.")
    if light not in LIGHTS:
        raise ValueError(f"light must be one of {LIGHTS}, got {light!r}.")
    n = len(labels)
    rng = np.random.default_rng(seed)
    colour_ids, shape_ids = np.divmod(labels, len(SHAPES))
    size_ids = rng.integers(len(SIZES), size=n)
    bg_ids = rng.integers(len(BACKGROUNDS), size=n)
    radius = rng.uniform(*np.array(list(SIZES.values())).T[:, size_ids])
    # Centre: a random cell of a 3 x 3 grid, then a random offset that keeps the shape inside.
    row, col = rng.integers(3, size=n), rng.integers(3, size=n)
    free = np.maximum(IMAGE_SIZE - 2 * radius, 0.0)
    cy = radius + free * (row + rng.uniform(0.1, 0.9, n)) / 3
    cx = radius + free * (col + rng.uniform(0.1, 0.9, n)) / 3
    grey = rng.uniform(*np.array(list(BACKGROUNDS.values())).T[:, bg_ids])
    colour = np.array(list(COLOURS.values()), np.float32)[colour_ids]
    colour = colour + rng.normal(0.0, _COLOUR_JITTER / 2, (n, 3))
    mask = _masks(shape_ids, radius, cx, cy)[..., None]
    scene = np.where(mask, colour[:, None, None, :], grey[:, None, None, None])
    noise = rng.normal(0.0, _NOISE_STD, scene.shape)
    forms = rng.integers(len(_CAPTIONS), size=n)
    if light == "warm":  # drawn last, so a neutral render is unchanged by the option
        strength = rng.uniform(*WARM_STRENGTH, n)[:, None, None, None]
        scene = scene * (1.0 - strength * (1.0 - np.array(WARM_GAIN)))
    images = np.clip(np.round(scene + noise), 0, 255).astype(np.uint8)
    colour_names, sizes, bgs = list(COLOURS), list(SIZES), list(BACKGROUNDS)
    captions = [
        _CAPTIONS[forms[i]].format(
            size=sizes[size_ids[i]], colour=colour_names[colour_ids[i]],
            shape=SHAPES[shape_ids[i]], where=_where(row[i], col[i]), bg=bgs[bg_ids[i]])
        for i in range(n)]
    return images, captions


def balanced_labels(num_examples, *, seed):
    """`num_examples` labels, every class equally often (up to one), in a seeded random order."""
    return np.random.default_rng(seed).permutation(
        np.arange(num_examples) % len(CLASS_NAMES)).astype(np.int64)


_SPLITS = {"train": (1, 100), "test": (2, 40)}  # split -> (seed, examples per class)
SPLITS = tuple(_SPLITS)
TFDS_NAMES = {"neutral": "p4q_shapes", "warm": "p4q_shapes_warm"}  # light -> TFDS builder


def split_examples(split, light="neutral"):
    """(images, labels, captions) of a split, exactly as the TFDS builder of `light`
    (`TFDS_NAMES`) stores them."""
    seed, per_class = _SPLITS[split]
    labels = balanced_labels(per_class * len(CLASS_NAMES), seed=(0, seed, 0))
    images, captions = render(labels, seed=(0, seed, 1), light=light)
    return images, labels, captions


def stream_seed(seed, step):
    """The seeds of pretraining batch `step`: (labels seed, render seed), disjoint from the splits."""
    return (1, seed, step, 0), (1, seed, step, 1)
