"""Where the text comes from: files, folders, globs, jsonl records or the built-in corpus, read as
streams of documents in bounded memory."""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lm_lightning.chat_template import record_messages
from lm_lightning.errors import UserError

BUILTIN_CORPUS = "builtin:pydoc_data"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")  # each also read gzip-compressed, as .txt.gz
READ_BLOCK = 8 << 20  # bytes read at a time: bounded memory whatever the file size
_PIECE_CHARS = 16 << 10  # characters per piece of text handed to the tokenizer


class DataError(UserError):
    """Bad corpus or data configuration; the message names the problem and the fix."""


@dataclass(frozen=True)
class Source:
    """One file of the corpus (or the built-in corpus). Each yields one stream of documents."""

    path: str
    size: int
    mtime_ns: int

    @property
    def fingerprint(self) -> dict:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


def resolve_sources(path: str | None) -> list[Source]:
    """The files ``path`` names: a file, a folder (recursively), or a glob; ``None``: the built-in corpus."""
    if path is None:
        # Each topic is its own source, so validation holds the tail of every topic.
        return [Source(f"{BUILTIN_CORPUS}/{topic}", len(text.encode()), 0) for topic, text in _builtin_topics()]
    expanded = os.path.expanduser(path)
    if glob_chars := any(c in expanded for c in "*?["):
        files = sorted(p for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(expanded):
        files = sorted(
            str(p) for p in Path(expanded).rglob("*") if p.is_file() and p.name.lower().removesuffix(".gz").endswith(TEXT_SUFFIXES)
        )
    elif os.path.isfile(expanded):
        files = [expanded]
    else:
        raise DataError(f"data.path {path!r} does not exist; point it at a text file, a folder or a glob")
    if not files:
        what = "matches no files" if glob_chars else f"has no {'/'.join(TEXT_SUFFIXES)} files"
        raise DataError(f"data.path {path!r} {what}; point it at UTF-8 text files")
    sources = []
    for f in files:
        st = os.stat(f)
        sources.append(Source(os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return sources


def _builtin_topics() -> list[tuple[str, str]]:
    """The Python reference documentation that ships with CPython (``pydoc_data.topics``), by topic."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


# The first bytes of compressed files that are not read as such.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}


def _decode(block: bytes, path: str, offset: int) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = next((name for magic, name in _COMPRESSED.items() if offset == 0 and block.startswith(magic)), None)
        if kind is not None:
            hint = "name it .gz" if kind == "gzip" else "decompress it"
            raise DataError(f"{path} is {kind}-compressed; {hint} (gzip files ending in .gz are read as they are)") from None
        raise DataError(
            f"{path} is not UTF-8: undecodable byte 0x{block[e.start]:02x} at byte offset {offset + e.start}; "
            "convert it (e.g. iconv -f GB18030 -t UTF-8) or remove it from data.path"
        ) from None


def _read_block(f, path: str) -> bytes:
    try:
        return f.read(READ_BLOCK)
    except (OSError, EOFError, zlib.error) as e:  # a .gz file that is not gzip, or is cut short
        raise DataError(f"{path} is not a whole gzip file ({e}); fix it, or remove it from data.path") from None


def _read_blocks(path: str) -> Iterator[str]:
    """Stream a text file as decoded blocks of about ``READ_BLOCK`` bytes, each cut at a line end."""
    offset = 0
    rest = b""
    with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
        while block := _read_block(f, path):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # no line end yet: keep reading, a line is never split mid-character
                rest = block
                continue
            rest = block[cut:]
            yield _decode(block[:cut], path, offset)
            offset += cut
    if rest:
        yield _decode(rest, path, offset)


def _read_lines(path: str) -> Iterator[str]:
    for block in _read_blocks(path):
        yield from block.splitlines(keepends=True)


def _read_pieces(path: str) -> Iterator[str]:
    """Stream a text file as pieces of about ``_PIECE_CHARS`` characters cut at line ends: big
    enough that per-piece Python overhead vanishes, small enough to spread over all cores."""
    for block in _read_blocks(path):
        start = 0
        while start < len(block):
            end = block.find("\n", start + _PIECE_CHARS) + 1 or len(block)
            yield block[start:end]
            start = end


@dataclass(frozen=True)
class Conversation:
    """A ``.jsonl`` record that holds ``messages`` (or ``prompt`` and ``completion``): rendered with a chat template."""

    messages: list[dict]
    where: str
    """The file and line it came from, for error messages."""


def _read_jsonl_documents(path: str, field: str) -> Iterator[str | Conversation]:
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno} is not JSON ({e.msg}); fix or remove that line") from None
        where = f"{path} line {lineno}"
        if isinstance(record, dict) and (messages := record_messages(record, where)) is not None:
            yield Conversation(messages, where)
            continue
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(
                f"{where} has no string {field!r} field (nor messages, nor prompt and completion); set data.jsonl_field "
                "to the field that holds the text"
            )
        yield record[field]


def iter_documents(source: Source, jsonl_field: str) -> Iterator[Iterable[str] | Conversation]:
    """Yield each document of ``source``: an iterable of text pieces (a text file's lines), or a :class:`Conversation`."""
    if source.path.startswith(BUILTIN_CORPUS):
        yield [dict(_builtin_topics())[source.path.split("/", 1)[1]]]
    elif source.path.lower().removesuffix(".gz").endswith(".jsonl"):
        for doc in _read_jsonl_documents(source.path, jsonl_field):
            yield doc if isinstance(doc, Conversation) else [doc]
    else:
        yield _read_pieces(source.path)


def mixed_corpus_error(where: str, conversations: bool) -> DataError:
    """The one line that refuses a corpus of conversations and plain text together."""
    kind, other = ("plain text", "conversations") if conversations else ("a conversation", "plain text")
    return DataError(
        f"{where} holds {kind} in a corpus of {other}; train on one kind at a time (put them in separate data.path "
        "folders), or make the text a conversation"
    )


def is_conversation_corpus(sources: list[Source], jsonl_field: str) -> bool:
    """Whether the corpus is conversations, as its first document says; a document of the other kind is refused
    when the corpus is tokenized (:func:`mixed_corpus_error`)."""
    return isinstance(next(iter_documents(sources[0], jsonl_field), None), Conversation)


def _document_text(doc: Iterable[str] | Conversation) -> Iterable[str]:
    if isinstance(doc, Conversation):
        return [f"{m['role']}\n{m['content']}\n" for m in doc.messages]
    return doc


def iter_sample(sources: list[Source], jsonl_field: str, max_bytes: int, train_fraction: float) -> Iterator[str]:
    """Text to train the tokenizer on: the training part of every source (its first ``train_fraction``
    of bytes: validation text must not shape the vocabulary it is scored with), at most ``max_bytes``
    in all, shared equally between sources, so a huge corpus trains its tokenizer in bounded time."""
    share = max(1, max_bytes // len(sources))
    for source in sources:
        left = min(share, int(source.size * train_fraction))
        for doc in iter_documents(source, jsonl_field):
            for piece in _document_text(doc):
                data = piece.encode("utf-8")
                if len(data) >= left:
                    yield data[:left].decode("utf-8", errors="ignore")
                    left = 0
                    break
                left -= len(data)
                yield piece
            if left <= 0:
                break

