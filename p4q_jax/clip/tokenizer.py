"""CLIP's byte-level BPE tokenizer, id for id equal to open_clip's default tokenizer.

Text is cleaned the way open_clip's ``SimpleTokenizer`` cleans it (``ftfy.fix_text``, HTML
unescaping applied twice, whitespace runs collapsed, lower case), split into words with CLIP's
regex, and each word is byte-level BPE encoded. ``Tokenizer.__call__`` / ``tokenize`` wrap the ids
in ``<start_of_text>`` / ``<end_of_text>``, zero-pad to ``context_length`` and, when too long,
truncate while keeping ``<end_of_text>`` as the last token.

The vocabulary is looked up in this order (``find_vocab``):
  1. an explicit ``vocab_path``: a ``bpe_simple_vocab_16e6.txt.gz`` file, or a Hugging Face CLIP
     checkpoint/tokenizer directory holding ``vocab.json`` and ``merges.txt`` (ids then follow
     ``vocab.json``);
  2. the ``bpe_simple_vocab_16e6.txt.gz`` shipped inside this package;
  3. the same file shipped by an installed ``open_clip`` or ``clip`` package (located without
     importing either).

``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's vocabulary (MIT License, (c) 2021 OpenAI).
"""

import functools
import gzip
import html
import importlib.resources
import importlib.resources.abc
import importlib.util
import json
import os
import pathlib
import typing
from collections import abc

import ftfy
import numpy as np
import regex

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# Hugging Face's CLIPTokenizer files spell the same two special tokens differently.
_HF_SOT_TOKEN = "<|startoftext|>"
_HF_EOT_TOKEN = "<|endoftext|>"

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# The 16e6 file holds far more merges than CLIP uses: CLIP keeps the first 48894 so that
# 256 byte tokens + 256 end-of-word byte tokens + merges + 2 special tokens = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
# CLIP's word splitter: contractions, letter runs, single digits, runs of other non-space symbols.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

PathLike = str | os.PathLike
VocabSource = pathlib.Path | importlib.resources.abc.Traversable
Texts = str | abc.Sequence[str]


class _Vocab(typing.NamedTuple):
    """Token -> id table, merges in rank order, and the spelling of the two special tokens."""

    encoder: dict[str, int]
    merges: list[tuple[str, str]]
    sot_token: str
    eot_token: str


@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, so BPE never sees whitespace or
    control characters. Insertion order (printable bytes first) fixes the first 256 token ids."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in table):
        table[byte] = chr(256 + offset)
    return table


def _clean(text: str) -> str:
    """open_clip's 'lower' clean-up: fix mojibake, unescape HTML twice, squash whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def find_vocab(vocab_path: PathLike | None = None) -> VocabSource:
    """Returns where the vocabulary lives: a gz file, a Hugging Face tokenizer directory, or the
    packaged gz file (a ``Traversable``, a plain ``pathlib.Path`` for ordinary installs).

    Raises:
      FileNotFoundError: ``vocab_path`` does not exist, or no vocabulary is found at all.
    """
    if vocab_path is not None:
        path = pathlib.Path(vocab_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"CLIP tokenizer vocabulary not found: {os.fspath(vocab_path)!r} does not exist"
            )
        return path
    shipped = importlib.resources.files(__package__) / VOCAB_FILENAME
    if shipped.is_file():
        return shipped
    looked_in = [str(shipped)]
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = pathlib.Path(location) / VOCAB_FILENAME
            if candidate.is_file():
                return candidate
            looked_in.append(str(candidate))
    raise FileNotFoundError(
        f"no CLIP tokenizer vocabulary {VOCAB_FILENAME!r} found; looked in {looked_in}"
    )


def _load_gz_vocab(source: VocabSource) -> _Vocab:
    """open_clip's ids from the gzip'd merges list: bytes, end-of-word bytes, merges, specials."""
    try:
        with source.open("rb") as raw, gzip.open(raw) as stream:
            lines = stream.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{str(source)!r} is not a gzip-compressed CLIP BPE vocabulary like "
            f"{VOCAB_FILENAME!r}; pass such a file or a Hugging Face CLIP tokenizer directory "
            "holding vocab.json and merges.txt"
        ) from error
    # The first line is a version header.
    merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
    byte_tokens = list(_byte_to_unicode().values())
    tokens = [*byte_tokens, *(token + _END_OF_WORD for token in byte_tokens)]
    tokens += ["".join(merge) for merge in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    encoder = {token: index for index, token in enumerate(tokens)}
    return _Vocab(encoder=encoder, merges=merges, sot_token=SOT_TOKEN, eot_token=EOT_TOKEN)


def _load_hf_vocab(directory: pathlib.Path) -> _Vocab:
    """Reads Hugging Face CLIPTokenizer files: ids follow vocab.json, ranks follow merges.txt."""
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        raise ValueError(
            f"{str(directory)!r} is a directory without vocab.json and merges.txt; expected a "
            f"Hugging Face CLIP tokenizer directory holding both, or pass a {VOCAB_FILENAME!r} file"
        )
    encoder = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    for merge in merges:
        if len(merge) != 2 or "".join(merge) not in encoder:
            raise ValueError(
                f"{str(merges_file)!r}: merge {' '.join(merge)!r} is malformed or not in vocab.json"
            )
    specials = []
    for names in ((SOT_TOKEN, _HF_SOT_TOKEN), (EOT_TOKEN, _HF_EOT_TOKEN)):
        found = [name for name in names if name in encoder]
        if not found:
            raise ValueError(f"{str(vocab_file)!r} has none of the special tokens {names}")
        specials.append(found[0])
    return _Vocab(encoder=encoder, merges=merges, sot_token=specials[0], eot_token=specials[1])


def _check_texts(texts: Texts) -> list[str]:
    """Accepts one string or a sequence of strings; anything else is a TypeError naming it."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, abc.Iterable):
        raise TypeError(
            f"texts must be a str or a sequence of str, got {type(texts).__name__}: {texts!r}"
        )
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}: {text!r}")
    return texts


def _check_context_length(context_length: int) -> None:
    """At least SOT and EOT must fit."""
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise TypeError(
            f"context_length must be an int, got {type(context_length).__name__}: "
            f"{context_length!r}"
        )
    if context_length < 2:
        raise ValueError(
            f"context_length={context_length} is too small: it must be >= 2 to hold SOT and EOT"
        )


class Tokenizer:
    """CLIP's byte-level BPE tokenizer; tables are built once, BPE results are cached per word.

    Attributes:
      vocab_source: where the vocabulary was read from (see ``find_vocab``).
      sot_id, eot_id: ids of the start-of-text and end-of-text tokens.
      vocab_size: number of ids.
    """

    def __init__(self, vocab_path: PathLike | None = None):
        self.vocab_source = find_vocab(vocab_path)
        if isinstance(self.vocab_source, pathlib.Path) and self.vocab_source.is_dir():
            vocab = _load_hf_vocab(self.vocab_source)
        else:
            vocab = _load_gz_vocab(self.vocab_source)
        self._encoder = vocab.encoder
        self._decoder = {index: token for token, index in vocab.encoder.items()}
        self._ranks = {merge: rank for rank, merge in enumerate(vocab.merges)}
        self._byte_encoder = _byte_to_unicode()
        self._byte_decoder = {char: byte for byte, char in self._byte_encoder.items()}
        self.sot_id = vocab.encoder[vocab.sot_token]
        self.eot_id = vocab.encoder[vocab.eot_token]
        self.vocab_size = len(vocab.encoder)
        # Special tokens written literally in the text are matched first and map to their own id,
        # as in open_clip (so "<end_of_text>" in a prompt yields the EOT id).
        self._pattern = regex.compile(
            "|".join([regex.escape(vocab.sot_token), regex.escape(vocab.eot_token), _WORD_PATTERN]),
            regex.IGNORECASE,
        )
        self._word_cache = {vocab.sot_token: [self.sot_id], vocab.eot_token: [self.eot_id]}

    def _bpe(self, word: str) -> list[int]:
        """Ids of one regex word: repeatedly merges every occurrence of the lowest-ranked pair."""
        chars = "".join(self._byte_encoder[byte] for byte in word.encode("utf-8"))
        symbols = [*chars[:-1], chars[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged = []
            index = 0
            while index < len(symbols):
                pair = symbols[index:index + 2]
                if len(pair) == 2 and pair[0] == first and pair[1] == second:
                    merged.append(first + second)
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return [self._encoder[symbol] for symbol in symbols]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
        ids = []
        for word in self._pattern.findall(_clean(text)):
            word_ids = self._word_cache.get(word)
            if word_ids is None:
                word_ids = self._word_cache[word] = self._bpe(word)
            ids.extend(word_ids)
        return ids

    def decode(self, ids: abc.Iterable[int]) -> str:
        """Text of ``ids``; end-of-word markers become spaces and the trailing one is dropped."""
        try:
            chars = "".join(self._decoder[int(index)] for index in ids)
        except KeyError as error:
            raise ValueError(
                f"token id {error.args[0]} is outside the vocabulary of {self.vocab_size} ids"
            ) from None
        raw = bytes(self._byte_decoder[char] for char in chars)
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

    def __call__(self, texts: Texts, *, context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
        """int32 [N, context_length] ids: SOT, text ids, EOT, zero padding.

        Too-long texts are cut to ``context_length`` with EOT overwriting the last kept id, as in
        open_clip, so the text encoder's EOT pooling always finds it.
        """
        texts = _check_texts(texts)
        _check_context_length(context_length)
        result = np.zeros((len(texts), context_length), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            result[row, :len(ids)] = ids
        return result


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(vocab_path: str | None) -> Tokenizer:
    """Builds the BPE tables once per vocabulary, not once per ``tokenize`` call."""
    return Tokenizer(vocab_path=vocab_path)


def tokenize(
    texts: Texts,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    vocab_path: PathLike | None = None,
) -> np.ndarray:
    """``open_clip.tokenize`` as int32 numpy; one Tokenizer is kept per ``vocab_path``."""
    key = None if vocab_path is None else os.fspath(vocab_path)
    return _cached_tokenizer(key)(texts, context_length=context_length)
