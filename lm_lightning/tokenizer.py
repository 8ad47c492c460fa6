"""Byte-level BPE tokenizer: train, load, save, and the byte length of every token.

Byte-level means every UTF-8 string round-trips exactly (Chinese, emoji, tabs, CRLF): the base
alphabet is the 256 byte values, and BPE merges frequent byte sequences into tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lm_lightning.errors import UserError
from lm_lightning.files import atomic_write_text

EOT = "<|endoftext|>"
"""Separates documents in the token stream; generation stops on it."""

SPECIAL_TOKENS = [EOT]
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
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; fix data.tokenizer_path or unset it to train one")
    return tokenizer_from_str(path.read_text(encoding="utf-8", errors="replace"), source=str(path))


def tokenizer_from_str(text: str, source: str = "checkpoint") -> Tokenizer:
    try:
        json.loads(text)
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # json.JSONDecodeError or the tokenizers library's own Exception
        raise TokenizerError(f"tokenizer in {source} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    if tokenizer.token_to_id(EOT) is None:
        raise TokenizerError(f"tokenizer in {source} has no {EOT} token; train one with lm-lightning (unset data.tokenizer_path)")
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


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The UTF-8 bytes each token id stands for; special tokens stand for no bytes of text."""
    decoder = _byte_decoder()
    special = set(SPECIAL_TOKENS)
    table = []
    for i in range(tokenizer.get_vocab_size()):
        token = tokenizer.id_to_token(i)
        table.append(b"" if token in special else bytes(decoder[c] for c in token))
    return table
