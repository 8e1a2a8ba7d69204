"""CoOp's prompt learner: learned context vectors in place of the words of "X X ... X {class}.".

The token layout of every class prompt is fixed data (`build`): `<start_of_text>`,
`n_ctx` context slots, the class name and "." in the order the class position asks for
("end": ctx name; "middle": half ctx, name, other half; "front": name ctx), then
`<end_of_text>`, cropped after the longest prompt's EOT (a causal tower cannot see the
positions after it; `crop=False` keeps all 77). The learned context (one shared
[n_ctx, D], or class-specific [C, n_ctx, D]) is written into the slots of the frozen
token embeddings (`embed`), and the result goes through the (quantized) text tower's
embeddings entry point, so gradients reach the context through the tower.

With a shared context, every prompt starts with the same `shared_prefix` positions
(`<start_of_text>` + context for "end"; + half the context for "middle"), which the
tower can encode once for all classes (`CLIP.encode_text_prefixed`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax.clip import tokenizer as tokenizer_lib

POSITIONS = ("end", "middle", "front")
_PLACEHOLDER = "X"


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Token layout of the class prompts. Arrays are numpy: built once, constant."""

    tokens: np.ndarray  # [C, L] int32; context slots hold the placeholder token
    context_positions: np.ndarray  # [C, n_ctx] int32
    eot: np.ndarray  # [C] int32

    @property
    def n_ctx(self) -> int:
        return self.context_positions.shape[1]

    @property
    def shared_prefix(self) -> int:
        """Leading positions that are the same in every prompt under a shared context."""
        slot = np.full(self.tokens.shape, -1)
        np.put_along_axis(slot, self.context_positions,
                          np.arange(self.n_ctx)[None].repeat(len(slot), 0), axis=1)
        same = (self.tokens == self.tokens[:1]).all(0) & (slot == slot[:1]).all(0)
        differs = np.flatnonzero(~same)
        length = differs[0] if differs.size else self.tokens.shape[1]
        return int(min(length, self.eot.min()))  # every EOT stays in the per-class part


def check_class_names(class_names):
    """Refuses a str (it would be read as one class per character), an empty list and
    names that are not str -> the names as a tuple."""
    if isinstance(class_names, (str, bytes)):
        raise TypeError(f"class_names: expected a list of class names, got the "
                        f"{type(class_names).__name__} {class_names!r}; wrap one name in a list")
    class_names = tuple(class_names)
    if not class_names:
        raise ValueError("class_names: expected at least one class name, got none")
    for i, name in enumerate(class_names):
        if not isinstance(name, str):
            raise TypeError(f"class_names[{i}]: expected a str, got {name!r}")
    return class_names


def build(class_names, *, n_ctx, position="end", context_length=77, crop=True,
          vocab_path=None):
    """Token layouts of "X ... X {name}." for every class (see module docstring)."""
    class_names = check_class_names(class_names)
    if position not in POSITIONS:
        raise ValueError(f"class token position {position!r} unknown; expected one of {POSITIONS}")
    if n_ctx < 1:
        raise ValueError(f"n_ctx={n_ctx} must be >= 1")
    tok = tokenizer_lib.Tokenizer(vocab_path)
    (slot,) = tok.encode(_PLACEHOLDER)
    dot = tok.encode(".")
    rows, slots = [], []
    for name in class_names:
        words = tok.encode(name)
        half = n_ctx // 2 if position == "middle" else (0 if position == "front" else n_ctx)
        if position == "front":
            body = words + [slot] * n_ctx
            first = 1 + len(words)
            positions = list(range(first, first + n_ctx))
        else:
            body = [slot] * half + words + [slot] * (n_ctx - half)
            positions = list(range(1, 1 + half)) + list(
                range(1 + half + len(words), 1 + n_ctx + len(words)))
        row = [tok.sot_id] + body + dot + [tok.eot_id]
        if len(row) > context_length:
            raise ValueError(f"class name {name!r}: its prompt has {len(row)} tokens, more than "
                             f"the context length {context_length}")
        rows.append(row)
        slots.append(positions)
    length = max(len(r) for r in rows) if crop else context_length
    tokens = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return Prompts(tokens=tokens, context_positions=np.asarray(slots, np.int32),
                   eot=np.asarray([len(r) - 1 for r in rows], np.int32))


def init_context(key, *, n_ctx, width, num_classes=None, std=0.02):
    """N(0, std^2) context: shared [n_ctx, D], or class-specific [C, n_ctx, D]."""
    shape = (n_ctx, width) if num_classes is None else (num_classes, n_ctx, width)
    return std * jax.random.normal(key, shape, jnp.float32)


def context_from_phrase(model, params, phrase, *, vocab_path=None):
    """CoOp's phrase initialisation: the token embeddings of e.g. "a photo of a" [n, D]."""
    ids = tokenizer_lib.Tokenizer(vocab_path).encode(phrase)
    if not ids:
        raise ValueError(f"context phrase {phrase!r} has no tokens")
    return model.apply({"params": params}, jnp.asarray([ids], jnp.int32),
                       method=model.embed_tokens)[0]


def embed(prompts, token_embeddings, context):
    """Writes the context into the slots of the prompts' token embeddings -> [C, L, D]."""
    num_classes = token_embeddings.shape[0]
    context = jnp.broadcast_to(context, (num_classes, prompts.n_ctx, context.shape[-1]))
    rows = jnp.arange(num_classes)[:, None]
    return token_embeddings.at[rows, prompts.context_positions].set(
        context.astype(token_embeddings.dtype))


def length_buckets(eot, start, max_buckets):
    """Classes grouped by how many positions from `start` their prompts need (up to their
    EOT), each group padded only to its own longest: the text tower then runs on far fewer
    padded positions when class names differ in length (ImageNet's run from 1 to 20
    tokens). At most `max_buckets` groups, cut where they leave the fewest positions in all
    (dynamic programming over the distinct lengths).

    Returns [(class indices int [n], positions)], shortest first; static (numpy), since
    every group is its own shape in the compiled program.
    """
    need = np.asarray(eot) + 1 - start
    lengths, counts = np.unique(need, return_counts=True)
    k, m = min(max_buckets, len(lengths)), len(lengths)
    total = np.concatenate([[0], np.cumsum(counts)])
    cost = np.full((k + 1, m + 1), np.inf)
    cut = np.zeros((k + 1, m + 1), int)
    cost[0, 0] = 0
    for g in range(1, k + 1):
        for j in range(g, m + 1):  # groups 1..g cover the j shortest lengths
            options = [cost[g - 1, i] + lengths[j - 1] * (total[j] - total[i])
                       for i in range(g - 1, j)]
            cut[g, j] = g - 1 + int(np.argmin(options))
            cost[g, j] = min(options)
    bounds, j = [], m
    for g in range(k, 0, -1):
        bounds.append((lengths[cut[g, j]], lengths[j - 1]))
        j = cut[g, j]
    return [(np.flatnonzero((need >= lo) & (need <= hi)), int(hi)) for lo, hi in bounds[::-1]]
