"""Files shipped with the package.

`TINY_CLIP`: a small CLIP pretrained by `experiments/tiny_clip/pretrain.py` on the rendered
shapes dataset (`data.shapes`), in the Orbax form (`clip.load(TINY_CLIP)`). It is the model of
the offline demo (`python main.py`); how it was made (command, seed, library versions, final
zero-shot accuracy) is in its `p4q_clip.json` under "provenance".
"""
import pathlib

TINY_CLIP = pathlib.Path(__file__).parent / "tiny_clip_shapes"
