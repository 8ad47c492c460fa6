"""Byte-level BPE tokenizer: train, load, save, and the byte length of every token.

Byte-level means every UTF-8 string round-trips exactly (Chinese, emoji, tabs, CRLF): the base
alphabet is the 256 byte values, and BPE merges frequent byte sequences into tokens.

A pretrained model's tokenizer (a transformers folder's ``tokenizer.json``, or GPT-2's ``vocab.json`` +
``merges.txt``) is used as it is, if it can spell every text: byte-level (GPT-2, Qwen, Llama 3), or
sentencepiece-style with byte fallback (Llama 2, Mistral, Gemma: ``▁`` for a space, ``<0xNN>`` tokens for
the bytes of characters outside its vocabulary). Its conventions come from the
tokenizer itself, so a checkpoint that holds only ``tokenizer.json`` keeps them: the end-of-text token
(documents are separated by it, generation stops at it) is the first of :data:`END_OF_TEXT` it has; a
beginning-of-text token starts each document when its post-processor adds one (what transformers'
``add_bos_token`` writes there, as Llama's tokenizers do).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lm_lightning.errors import UserError
from lm_lightning.files import atomic_write_text, read_source_text

EOT = "<|endoftext|>"
"""Separates documents in the token stream; generation stops on it."""

END_OF_TEXT = (EOT, "</s>", "<|end_of_text|>", "<eos>")
"""End-of-text tokens of the families we load (ours, GPT-2 and Qwen; Llama 2; Llama 3; Gemma), in order of preference."""

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
"""The role markers of the default chat template (ChatML): every tokenizer we train has them, so any model of ours
can be fine-tuned on conversations and talked to."""

SPECIAL_TOKENS = [EOT, IM_START, IM_END]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# GPT-2's split into words, numbers, punctuation and whitespace, with one change: runs of CJK
# characters (Han, kana, Hangul) are cut into pieces of at most 4 characters. GPT-2's `\p{L}+`
# makes a whole line of Chinese, which has no spaces, a single "word"; BPE then learns rare
# line-long tokens and training slows down (huggingface/tokenizers issue 1395). Pieces of up to 4
# characters still let BPE learn the common two- and three-character words.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
PRE_TOKENIZER_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)"
    rf"| ?[{_CJK}]{{1,4}}"
    rf"| ?[^\s\p{{N}}\p{{P}}\p{{S}}{_CJK}]+"
    r"| ?\p{N}+"
    r"| ?[^\s\p{L}\p{N}]+"
    r"|\s+(?!\S)|\s+"
)


class TokenizerError(UserError):
    """A tokenizer file that cannot be used."""


def _new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` tokens (at most; fewer if the text is small)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE}")
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` atomically: a reader sees the old file or the new one, never half."""
    atomic_write_text(path, tokenizer.to_str(), "tokenizer")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizer.json``, or the tokenizer of a transformers folder (see :func:`folder_tokenizer`). A training
    checkpoint's is :func:`lm_lightning.checkpoint.tokenizer_of`'s."""
    path = Path(path)
    if path.is_dir():
        return folder_tokenizer(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; fix data.tokenizer_path or unset it to train one")
    return tokenizer_from_str(read_source_text(path, errors="replace"), source=str(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(read_source_text(path)) if path.is_file() else {}
    except ValueError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})") from None


def declared_special_tokens(folder: str | os.PathLike, tokenizer: Tokenizer) -> dict[str, list[str]]:
    """The ``bos``, ``eos`` and ``unk`` tokens a transformers folder declares (``tokenizer_config.json``'s
    ``*_token``, else the ids of ``generation_config.json`` and ``config.json``, named by ``tokenizer``, the
    folder's, already loaded), each as a list (generation may stop at several)."""
    folder = Path(folder)
    configs = [_read_json(folder / name) for name in ("tokenizer_config.json", "generation_config.json", "config.json")]
    names = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    declared: dict[str, list[str]] = {}
    for kind in ("bos", "eos", "unk"):
        token = configs[0].get(f"{kind}_token")
        if isinstance(token, dict):  # an AddedToken written out
            token = token.get("content")
        ids = next((c[f"{kind}_token_id"] for c in configs[1:] if c.get(f"{kind}_token_id") is not None), None)
        ids = ids if isinstance(ids, list) else [] if ids is None else [ids]
        tokens = ([token] if token else []) + [names[i] for i in ids if i in names]
        declared[kind] = list(dict.fromkeys(tokens))
    return declared


def folder_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a transformers folder: its ``tokenizer.json``, else GPT-2's ``vocab.json`` and
    ``merges.txt`` (a byte-level BPE, its declared special tokens registered as special)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder / "tokenizer.json")
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise TokenizerError(
            f"{folder} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt (GPT-2); "
            "copy them from the model's original folder"
        )
    try:
        tokenizer = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    except Exception as e:  # the tokenizers library's own Exception
        raise TokenizerError(f"cannot read {folder}/vocab.json and merges.txt ({str(e).splitlines()[0]})") from None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for tokens in declared_special_tokens(folder, tokenizer).values() for t in tokens]
    tokenizer.add_special_tokens([t for t in dict.fromkeys(specials) if tokenizer.token_to_id(t) is not None] or [EOT])
    return tokenizer_from_str(tokenizer.to_str(), source=f"{folder}/vocab.json")


def end_of_text(tokenizer: Tokenizer) -> int:
    """Id of the tokenizer's end-of-text token: the first of :data:`END_OF_TEXT` it has."""
    for token in END_OF_TEXT:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    raise TokenizerError(f"the tokenizer has no end-of-text token (one of {', '.join(END_OF_TEXT)})")


def begin_of_text(tokenizer: Tokenizer) -> int | None:
    """Id of the token the tokenizer's post-processor puts before a text (Llama's ``<s>``), or ``None``."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    return full[start - 1] if start else None


def tokenizer_from_str(text: str, source: str = "checkpoint") -> Tokenizer:
    try:
        json.loads(text)
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # json.JSONDecodeError or the tokenizers library's own Exception
        raise TokenizerError(f"tokenizer in {source} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    if not any(tokenizer.token_to_id(t) is not None for t in END_OF_TEXT):
        raise TokenizerError(
            f"tokenizer in {source} has no end-of-text token (one of {', '.join(END_OF_TEXT)}); "
            "train one with lm-lightning (unset data.tokenizer_path)"
        )
    return tokenizer


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-to-printable-character map that byte-level BPE uses (GPT-2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


SPACE_MARK = "\u2581"
"""``▁``: how sentencepiece-style tokenizers (Llama 2, Mistral, Gemma) write a space inside a token."""

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def is_byte_fallback(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` is sentencepiece-style with byte fallback: a character outside its vocabulary
    is spelt as ``<0xNN>`` tokens, one per UTF-8 byte, and ``▁`` stands for a space."""
    return bool(getattr(tokenizer.model, "byte_fallback", False))


def continuation_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` for text that continues a document: without the space a sentencepiece-style tokenizer puts
    before each text it encodes (its normalizer's ``Prepend("▁")``, its Metaspace pre-tokenizer's
    ``prepend_scheme``); ``tokenizer`` itself where it puts none. A document encoded in pieces (a file's lines)
    then gets one such space, at its start, as when it is encoded whole, and its tokens spell its bytes."""
    spec = json.loads(tokenizer.to_str())

    def without_prepend(step: dict | None) -> dict | None:
        if step is None or step.get("type") == "Prepend":
            return None
        if step.get("type") == "Metaspace":
            step = {**step, "prepend_scheme": "never"}
            if "add_prefix_space" in step:  # the form tokenizers wrote before prepend_scheme
                step["add_prefix_space"] = False
            return step
        for key in ("normalizers", "pretokenizers"):
            if key in step:
                return {**step, key: [s for s in map(without_prepend, step[key]) if s is not None]}
        return step

    changed = {**spec, "normalizer": without_prepend(spec.get("normalizer")), "pre_tokenizer": without_prepend(spec.get("pre_tokenizer"))}
    return tokenizer if changed == spec else Tokenizer.from_str(json.dumps(changed))


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes per token id (int64), for bits per byte: :func:`token_bytes`' lengths."""
    return np.fromiter((len(b) for b in token_bytes(tokenizer)), dtype=np.int64)


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The UTF-8 bytes each token id stands for; special tokens stand for no bytes of text, other added
    tokens for their text.

    Byte-level tokenizers (GPT-2, Qwen, Llama 3) spell bytes in GPT-2's byte-to-character alphabet.
    Byte-fallback ones (Llama 2, Mistral, Gemma, TinyLlama) have ``<0xNN>`` tokens of one byte each and
    write a space as ``▁`` (so ``▁the`` is `` the``: the space a sentencepiece tokenizer puts before the
    first word of a text is counted, as the tokenizer's decoder drops it only at the start of a whole
    decode). Any other tokenizer raises :class:`TokenizerError`: it cannot spell every text.
    """
    added = tokenizer.get_added_tokens_decoder()
    byte_fallback = is_byte_fallback(tokenizer)
    decoder = _byte_decoder()
    table = []
    for i in range(tokenizer.get_vocab_size()):
        if i in added:
            table.append(b"" if added[i].special else added[i].content.encode("utf-8"))
            continue
        token = tokenizer.id_to_token(i) or ""
        if byte_fallback:
            byte = _BYTE_TOKEN.fullmatch(token)
            table.append(bytes([int(byte[1], 16)]) if byte else token.replace(SPACE_MARK, " ").encode("utf-8"))
            continue
        try:
            table.append(bytes(decoder[c] for c in token))
        except KeyError:
            raise TokenizerError(
                f"the tokenizer is not byte-level (token {i} is {token!r}) and has no byte fallback (<0xNN> tokens): "
                "only tokenizers that can spell every text are supported (byte-level BPE as GPT-2, Qwen and Llama 3 "
                "have; sentencepiece-style BPE with byte_fallback as Llama 2, Mistral and Gemma have)"
            ) from None
    return table
