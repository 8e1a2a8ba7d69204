"""The shapes datasets as TFDS builders ("p4q_shapes", "p4q_shapes_warm"), rendered locally.

Imported by the input pipeline (which registers them with TFDS) and not by the registry, so that
reading class names and prompts needs no TensorFlow.
"""
import tensorflow_datasets as tfds

from p4q_jax.data import shapes


class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder "p4q_shapes": 100 train and 40 test images per class, rendered locally."""

    name = shapes.TFDS_NAMES["neutral"]
    LIGHT = "neutral"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "40 colour x shape classes, 32 x 32 pixels."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=shapes.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)),
                "label": tfds.features.ClassLabel(names=shapes.CLASS_NAMES),
                "caption": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in shapes.SPLITS}

    def _generate_examples(self, split):
        images, labels, captions = shapes.split_examples(split, self.LIGHT)
        for i, (image, label, caption) in enumerate(zip(images, labels, captions)):
            yield i, {"image": image, "label": int(label), "caption": caption}


class WarmShapesBuilder(ShapesBuilder):
    """TFDS builder "p4q_shapes_warm": the same splits under warm light (the demo's downstream task)."""

    name = shapes.TFDS_NAMES["warm"]
    LIGHT = "warm"
    RELEASE_NOTES = {"1.0.0": "p4q_shapes' scenes under warm (tungsten-like) light."}
