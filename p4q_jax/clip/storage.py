"""Loading CLIP weights from disk, with no network: OpenAI, Hugging Face and Orbax layouts.

Every layout goes through one mapping: Hugging Face names are first renamed to OpenAI's
state-dict names (q/k/v fused into `in_proj`), and an OpenAI state dict is converted to
this project's Flax tree (torch's `[out, in]` linear weights transposed, the patch conv
to HWIO). Checks name the file and what is wrong: missing path, unknown layout,
unreadable, truncated or hostile files, missing/unexpected keys, shape mismatches (an
Orbax directory's config is checked against its stored array shapes before restoring),
weights that are NaN or infinite (naming the first such tensor).
"""

import json
import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from p4q_jax import atomic
from p4q_jax.clip import architectures
from p4q_jax.clip import model as model_lib
from p4q_jax.clip import torch_reader

ORBAX_MARKER = "p4q_clip.json"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Buffers and metadata that some OpenAI/open_clip files carry but hold no weights.
_IGNORED_KEYS = re.compile(
    r"(^|\.)(attn_mask|input_resolution|context_length|vocab_size|position_ids|"
    r"num_batches_tracked)$")
_RESNET_STAGES = (1, 2, 3, 4)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def _count_blocks(state, prefix):
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def _infer_vision(state):
    """The image tower's config from its shapes: a ViT, or (no `visual.proj`) a
    ModifiedResNet, whose stem width, stage depths and resolution OpenAI's build_model reads
    from `layer1.0.conv1`, the block indices and the attention pool's positions."""
    if "visual.proj" not in state and "visual.layer1.0.conv1.weight" in state:
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return architectures.VisionConfig(
            image_size=32 * grid, width=width, heads=width * 32 // 64,
            layers=tuple(_count_blocks(state, f"visual.layer{i}.") for i in _RESNET_STAGES))
    vision_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return architectures.VisionConfig(
        image_size=patch * grid,
        patch_size=patch,
        width=vision_width,
        layers=_count_blocks(state, "visual.transformer.resblocks."),
        heads=max(vision_width // 64, 1),
        mlp_dim=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
    )


def infer_openai_config(state, *, activation="quick_gelu"):
    """Infers a CLIPConfig from an OpenAI-layout state dict's shapes (as OpenAI's build_model)."""
    try:
        vision = _infer_vision(state)
        text_width = state["ln_final.weight"].shape[0]
        return architectures.CLIPConfig(
            embed_dim=state["text_projection"].shape[1],
            vision=vision,
            text=architectures.TextConfig(
                context_length=state["positional_embedding"].shape[0],
                vocab_size=state["token_embedding.weight"].shape[0],
                width=text_width,
                layers=_count_blocks(state, "transformer.resblocks."),
                heads=max(text_width // 64, 1),
                mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            ),
            activation=activation,
        )
    except KeyError as e:
        raise CheckpointError(
            f"not an OpenAI-layout CLIP state dict: key {e.args[0]!r} is missing") from e


def _linear(state, key):
    """Torch Linear [out, in] (+ bias) -> Flax Dense {kernel [in, out], bias}."""
    out = {"kernel": state.pop(f"{key}.weight").T}
    if f"{key}.bias" in state:
        out["bias"] = state.pop(f"{key}.bias")
    return out


def _layer_norm(state, key):
    return {"scale": state.pop(f"{key}.weight"), "bias": state.pop(f"{key}.bias")}


_BATCH_NORM = (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
               ("var", "running_var"))


def _batch_norm(state, key):
    return {ours: state.pop(f"{key}.{theirs}") for ours, theirs in _BATCH_NORM}


def _conv(state, key):
    """Torch Conv2d [out, in, h, w] -> Flax Conv {kernel [h, w, in, out]} (bias-free)."""
    return {"kernel": state.pop(f"{key}.weight").transpose(2, 3, 1, 0)}


def _resnet_modules(config):
    """(Flax path, torch key, kind) of every module of a ModifiedResNet of `config`, in
    `visual/` and `visual.` terms; kind is conv, bn, linear or the positions parameter."""
    modules = []
    for i in (1, 2, 3):
        modules += [(f"conv{i}", f"conv{i}", "conv"), (f"bn{i}", f"bn{i}", "bn")]
    for stage, depth in zip(_RESNET_STAGES, config.vision.layers):
        for j in range(depth):
            ours, theirs = f"layer{stage}_{j}/", f"layer{stage}.{j}."
            for i in (1, 2, 3):
                modules += [(f"{ours}conv{i}", f"{theirs}conv{i}", "conv"),
                            (f"{ours}bn{i}", f"{theirs}bn{i}", "bn")]
            if j == 0:  # stride 2 (stages 2-4) or 4x channels (stage 1): a projected shortcut
                modules += [(f"{ours}downsample_0", f"{theirs}downsample.0", "conv"),
                            (f"{ours}downsample_1", f"{theirs}downsample.1", "bn")]
    modules.append(("attnpool/positional_embedding", "attnpool.positional_embedding",
                    "param"))
    modules += [(f"attnpool/{n}", f"attnpool.{n}", "linear")
                for n in ("q_proj", "k_proj", "v_proj", "c_proj")]
    return modules


def _resnet(state, config):
    """The `visual.*` entries of a ModifiedResNet state dict -> its Flax tree."""
    read = {"conv": _conv, "bn": _batch_norm, "linear": _linear,
            "param": lambda state, key: state.pop(key)}
    flat = {ours: read[kind](state, f"visual.{theirs}")
            for ours, theirs, kind in _resnet_modules(config)}
    return traverse_util.unflatten_dict(flat, sep="/")


def _vit(state, config):
    """The `visual.*` entries of a ViT state dict -> its Flax tree."""
    return {
        "conv1": _conv(state, "visual.conv1"),
        "class_embedding": state.pop("visual.class_embedding"),
        "positional_embedding": state.pop("visual.positional_embedding"),
        "ln_pre": _layer_norm(state, "visual.ln_pre"),
        "transformer": _transformer(state, "visual.transformer.", config.vision.layers),
        "ln_post": _layer_norm(state, "visual.ln_post"),
        "proj": {"kernel": state.pop("visual.proj")},
    }


def _transformer(state, prefix, layers):
    blocks = {}
    for i in range(layers):
        p = f"{prefix}resblocks.{i}."
        blocks[f"resblocks_{i}"] = {
            "ln_1": _layer_norm(state, p + "ln_1"),
            "attn": {
                "in_proj": {"kernel": state.pop(p + "attn.in_proj_weight").T,
                            "bias": state.pop(p + "attn.in_proj_bias")},
                "out_proj": _linear(state, p + "attn.out_proj"),
            },
            "ln_2": _layer_norm(state, p + "ln_2"),
            "mlp": {"c_fc": _linear(state, p + "mlp.c_fc"),
                    "c_proj": _linear(state, p + "mlp.c_proj")},
        }
    return blocks


def openai_to_flax(state, config, *, source="state dict"):
    """OpenAI-layout state dict -> Flax params tree (float32), checked against `config`."""
    state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()
             if not _IGNORED_KEYS.search(k)}
    check_finite(state, source=source)
    remaining = dict(state)
    try:
        params = {
            "visual": (_resnet if config.vision.is_resnet else _vit)(remaining, config),
            "text": {
                "token_embedding": {"embedding": remaining.pop("token_embedding.weight")},
                "positional_embedding": remaining.pop("positional_embedding"),
                "transformer": _transformer(remaining, "transformer.", config.text.layers),
                "ln_final": _layer_norm(remaining, "ln_final"),
                "text_projection": {"kernel": remaining.pop("text_projection")},
            },
            "logit_scale": remaining.pop("logit_scale"),
        }
    except KeyError as e:
        missing = sorted(_expected_openai_keys(config) - set(state))
        raise CheckpointError(f"{source}: missing keys {missing} (first: {e.args[0]!r})") from e
    if remaining:
        raise CheckpointError(f"{source}: unexpected keys {sorted(remaining)}")
    check_shapes(params, config, source=source)
    return params


def _key_name(key):
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def check_finite(tree, *, source):
    """Raises CheckpointError naming the first float array of `tree` (a dict of arrays at any
    depth) that holds a NaN or an infinity: such weights load and run to chance-level
    results with no other sign. Checked on the host, one pass over the weights."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(leaf)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            name = "/".join(_key_name(k) for k in path)
            raise CheckpointError(f"{source}: {name} holds {bad} non-finite values (NaN or "
                                  f"inf) of {array.size}; the checkpoint is corrupt")


def _expected_openai_keys(config):
    keys = {"token_embedding.weight", "positional_embedding", "text_projection", "logit_scale",
            "ln_final.weight", "ln_final.bias"}
    blocks = [("transformer.", config.text.layers)]
    if config.vision.is_resnet:
        suffixes = {"conv": ["weight"], "linear": ["weight", "bias"], "param": [None],
                    "bn": [theirs for _, theirs in _BATCH_NORM]}
        keys |= {f"visual.{key}" + (f".{s}" if s else "")
                 for _, key, kind in _resnet_modules(config) for s in suffixes[kind]}
    else:
        keys |= {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                 "visual.proj"}
        for ln in ("visual.ln_pre", "visual.ln_post"):
            keys |= {f"{ln}.weight", f"{ln}.bias"}
        blocks.append(("visual.transformer.", config.vision.layers))
    for prefix, layers in blocks:
        for i in range(layers):
            p = f"{prefix}resblocks.{i}."
            keys |= {p + "attn.in_proj_weight", p + "attn.in_proj_bias"}
            for name in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
                keys |= {f"{p}{name}.weight", f"{p}{name}.bias"}
    return keys


def abstract_params(config):
    """The parameter shapes a model of `config` expects (no computation)."""
    model = model_lib.CLIP(config)
    images = jax.ShapeDtypeStruct((1, config.vision.image_size, config.vision.image_size, 3),
                                  np.float32)
    tokens = jax.ShapeDtypeStruct((1, config.text.context_length), np.int32)
    return jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]


def check_shapes(params, config, *, source):
    """Raises CheckpointError listing every parameter whose shape differs from `config`'s."""
    expected = abstract_params(config)
    flat_expected = {jax.tree_util.keystr(k): v.shape
                     for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_found = {jax.tree_util.keystr(k): np.shape(v)
                  for k, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"{k}: expected {flat_expected.get(k)}, found {flat_found.get(k)}"
                for k in sorted(set(flat_expected) | set(flat_found))
                if flat_expected.get(k) != flat_found.get(k)]
    if problems:
        raise CheckpointError(f"{source}: shape mismatch with the architecture: "
                              + "; ".join(problems))


def _hf_to_openai(state, *, text_layers, vision_layers):
    """Renames a Hugging Face CLIPModel state dict to OpenAI's keys (q/k/v fused)."""
    state = dict(state)
    out = {}

    def move(src, dst, transpose=False):
        value = state.pop(src)
        out[dst] = value.T if transpose else value

    def blocks(src, dst, layers):
        for i in range(layers):
            s, d = f"{src}.encoder.layers.{i}.", f"{dst}resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{d}attn.in_proj_{kind}"] = np.concatenate(
                    [state.pop(f"{s}self_attn.{n}_proj.{kind}") for n in "qkv"], axis=0)
                move(f"{s}self_attn.out_proj.{kind}", f"{d}attn.out_proj.{kind}")
                move(f"{s}layer_norm1.{kind}", f"{d}ln_1.{kind}")
                move(f"{s}layer_norm2.{kind}", f"{d}ln_2.{kind}")
                move(f"{s}mlp.fc1.{kind}", f"{d}mlp.c_fc.{kind}")
                move(f"{s}mlp.fc2.{kind}", f"{d}mlp.c_proj.{kind}")

    move("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
    move("text_model.embeddings.position_embedding.weight", "positional_embedding")
    blocks("text_model", "transformer.", text_layers)
    for kind in ("weight", "bias"):
        move(f"text_model.final_layer_norm.{kind}", f"ln_final.{kind}")
        move(f"vision_model.pre_layrnorm.{kind}", f"visual.ln_pre.{kind}")
        move(f"vision_model.post_layernorm.{kind}", f"visual.ln_post.{kind}")
    move("text_projection.weight", "text_projection", transpose=True)
    move("vision_model.embeddings.class_embedding", "visual.class_embedding")
    move("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight")
    move("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding")
    blocks("vision_model", "visual.transformer.", vision_layers)
    move("visual_projection.weight", "visual.proj", transpose=True)
    move("logit_scale", "logit_scale")
    out.update(state)  # leftovers surface as "unexpected keys" in openai_to_flax
    return out


def hf_config(config_json):
    """CLIPConfig from a Hugging Face `config.json` dict."""
    text, vision = config_json["text_config"], config_json["vision_config"]
    activation = text.get("hidden_act", "quick_gelu")
    if vision.get("hidden_act", activation) != activation:
        raise CheckpointError("different activations in the two towers are not supported")
    return architectures.CLIPConfig(
        embed_dim=config_json.get("projection_dim", 512),
        vision=architectures.VisionConfig(
            image_size=vision.get("image_size", 224),
            patch_size=vision.get("patch_size", 32),
            width=vision.get("hidden_size", 768),
            layers=vision.get("num_hidden_layers", 12),
            heads=vision.get("num_attention_heads", 12),
            mlp_dim=vision.get("intermediate_size", 3072),
        ),
        text=architectures.TextConfig(
            context_length=text.get("max_position_embeddings", 77),
            vocab_size=text.get("vocab_size", 49408),
            width=text.get("hidden_size", 512),
            layers=text.get("num_hidden_layers", 12),
            heads=text.get("num_attention_heads", 8),
            mlp_dim=text.get("intermediate_size", 2048),
        ),
        activation=activation,
        layer_norm_eps=text.get("layer_norm_eps", 1e-5),
    )


def read_json(path):
    """A JSON file's contents; an unreadable, truncated or malformed one names the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e


def _parse_config(data, *, parse, source):
    """`parse(data)` -> CLIPConfig; a missing or malformed field names `source`."""
    try:
        return parse(data)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{source}: not a valid CLIP config "
                              f"({type(e).__name__}: {e})") from e


def _read_torch(path):
    """A PyTorch file's state dict; a bad file is a CheckpointError naming it (and the entry)."""
    try:
        return torch_reader.read_state_dict(path)
    except torch_reader.ReadError as e:
        raise CheckpointError(str(e)) from e


def _read_safetensors(path):
    """A safetensors file's arrays; a truncated or corrupt one is a CheckpointError naming it."""
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _hf_dir_config(path):
    return _parse_config(read_json(path / "config.json"), parse=hf_config,
                         source=path / "config.json")


def _orbax_config(path):
    return _parse_config(read_json(path / ORBAX_MARKER), source=path / ORBAX_MARKER,
                         parse=lambda meta: architectures.CLIPConfig.from_dict(meta["config"]))


def _is_hf_dir(path):
    return (path / "config.json").exists() and any(
        (path / f).exists() for f in ("model.safetensors", "pytorch_model.bin"))


def config_from_metadata(path):
    """The CLIPConfig of an Orbax or Hugging Face checkpoint directory from its JSON
    metadata alone (no array is read); None for an OpenAI-layout file, whose architecture
    only its arrays' shapes tell."""
    path = pathlib.Path(path).absolute()
    if (path / ORBAX_MARKER).is_file():
        return _orbax_config(path)
    if path.is_dir() and _is_hf_dir(path):
        return _hf_dir_config(path)
    return None


def _load_hf_dir(path):
    config = _hf_dir_config(path)
    if (path / "model.safetensors").exists():
        source = path / "model.safetensors"
        state = _read_safetensors(source)
    else:
        source = path / "pytorch_model.bin"
        state = _read_torch(source)
    try:
        state = _hf_to_openai(state, text_layers=config.text.layers,
                              vision_layers=config.vision.layers)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r} for a Hugging Face "
                              "CLIPModel") from e
    return config, openai_to_flax(state, config, source=str(source))


def _load_openai_file(path, activation):
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    try:
        config = infer_openai_config(state, activation=activation)
    except (ValueError, IndexError, TypeError) as e:  # missing keys (CheckpointError), odd shapes
        raise CheckpointError(f"{path}: cannot infer the architecture ({e})") from e
    return config, openai_to_flax(state, config, source=str(path))


def bytes_on_disk(path) -> int:
    """Size of a file, or of every file under a directory."""
    path = pathlib.Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_tree(path, tree):
    """Writes a pytree of arrays with Orbax (as numpy, so any device layout works), atomically
    (`p4q_jax.atomic`): `path` appears complete or not at all; an existing one is refused.

    The calling process writes alone (no cross-process barrier), so in a multi-host run
    one process (e.g. process 0) can write an export while the others carry on.
    """
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with atomic.directory(path) as tmp, \
            ocp.StandardCheckpointer(multiprocessing_options=options) as ckptr:
        ckptr.save(tmp, jax.tree.map(np.asarray, tree), force=True)


def restore_tree(path, abstract=None):
    """Reads what `save_tree` wrote (as `abstract`'s shapes and dtypes if given); a missing,
    truncated or corrupted tree, or one holding a NaN or an infinity (`check_finite`), is a
    CheckpointError naming `path`."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such Orbax directory")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.restore(path, abstract)
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore: any failure on bad files)
            raise CheckpointError(f"{path}: cannot restore the arrays "
                                  f"({type(e).__name__}: {e})") from e
    check_finite(tree, source=path)
    return tree


def save(path, config, params, *, provenance=None):
    """Writes the Orbax form (`params/` + `p4q_clip.json`), atomically (`p4q_jax.atomic`).

    `provenance` (JSON-serialisable: how the weights were made) is stored in `p4q_clip.json`
    beside the config; loading ignores it."""
    meta = {"config": config.to_dict()}
    if provenance is not None:
        meta["provenance"] = provenance
    with atomic.directory(path) as tmp:
        save_tree(tmp / "params", params)
        (tmp / ORBAX_MARKER).write_text(json.dumps(meta, indent=2))


def _load_orbax_dir(path):
    """Reads `save`'s form, checking the stored arrays against the config before restoring."""
    config = _orbax_config(path)
    source = path / "params"
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(source).item_metadata
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore: any failure on bad files)
            raise CheckpointError(f"{source}: unreadable Orbax metadata "
                                  f"({type(e).__name__}: {e})") from e
        if not jax.tree.leaves(stored):  # orbax logs and returns None for a corrupt _METADATA
            raise CheckpointError(f"{source}: no readable array metadata (_METADATA is "
                                  "missing or corrupted)")
        check_shapes(stored, config, source=f"{source} (config from {path / ORBAX_MARKER})")
    return config, restore_tree(source, abstract_params(config))


def load_params(path, *, activation=None):
    """Reads a checkpoint -> (CLIPConfig, params as numpy/jax arrays).

    Args:
      path: an OpenAI-layout file (TorchScript archive or state dict: .pt/.pth/.bin,
        or .safetensors), a Hugging Face directory (config.json + model.safetensors or
        pytorch_model.bin), or an Orbax directory written by `save`.
      activation: override for OpenAI-layout files, whose activation is not stored
        (OpenAI's models use "quick_gelu", the default; open_clip's non-OpenAI ones "gelu").
    """
    path = pathlib.Path(path).absolute()  # Orbax reads absolute paths only
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    if path.is_dir():
        if (path / ORBAX_MARKER).exists():
            return _load_orbax_dir(path)
        if _is_hf_dir(path):
            return _load_hf_dir(path)
        raise CheckpointError(
            f"{path}: unknown checkpoint layout; expected a Hugging Face directory "
            f"(config.json + model.safetensors or pytorch_model.bin) or an Orbax directory "
            f"written by p4q_jax ({ORBAX_MARKER} + params/)")
    if path.suffix in _TORCH_SUFFIXES + (".safetensors",):
        return _load_openai_file(path, activation or "quick_gelu")
    raise CheckpointError(
        f"{path}: unknown checkpoint format {path.suffix!r}; expected one of "
        f"{_TORCH_SUFFIXES + ('.safetensors',)} or a directory")
