"""The token cache: a corpus tokenized once into memory-mapped shard files per split, with a
``meta.json`` that says exactly what they were built from. ``TokenCache`` owns its validity: a cache
whose sources, tokenizer or settings changed, or whose files are not whole, is rebuilt, never reused.

The pipeline runs once per corpus and tokenizer: read the sources, train or load the tokenizer,
tokenize in parallel batches, and write the shard files of each split (train and validation; shards of
at most ``shard_tokens`` tokens). Training then reads windows straight out of the memory maps, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from lm_lightning.chat_template import ChatError, ChatTemplate, span_mask, training_template
from lm_lightning.checkpoint import tokenizer_of
from lm_lightning.data.corpus import (
    BUILTIN_CORPUS,
    READ_BLOCK,
    Conversation,
    DataError,
    Source,
    is_conversation_corpus,
    iter_documents,
    iter_sample,
    mixed_corpus_error,
    resolve_sources,
)
from lm_lightning.files import WriteError, atomic_write_text, file_lock, remove_stale_temporaries, temporary_path
from lm_lightning.tokenizer import SPECIAL_TOKENS, begin_of_text, continuation_tokenizer, end_of_text, load_tokenizer, save_tokenizer, tokenizer_from_str, tokenizer_hash, train_tokenizer

CACHE_FORMAT = 3
SPLITS = ("train", "val")
TEST = "test"  # a third split, only in caches built with test_fraction > 0


def split_names(test_fraction: float) -> tuple[str, ...]:
    """The splits of a cache built with ``test_fraction``."""
    return SPLITS + ((TEST,) if test_fraction else ())
_ENCODE_BATCH = 256  # pieces per encode_batch call (tokenizers encodes a batch on all cores)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


MASK, STARTS = ".mask", ".starts"
"""Beside a conversation corpus's token shards (``.bin``): per token, whether it is a training target (uint8), and
where each conversation starts in its split (int64)."""


def shard_path(folder: Path, split: str, index: int, suffix: str = ".bin") -> Path:
    return folder / f"{split}-{index:05d}{suffix}"


class ShardWriter:
    """Appends a split's tokens to shard files of at most ``shard_tokens`` tokens each, under temporary
    names until ``commit`` renames them all into place."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype, suffix: str = ".bin"):
        self.folder, self.split, self.shard_tokens, self.dtype, self.suffix = folder, split, shard_tokens, dtype, suffix
        self.sizes: list[int] = []
        self._file = None
        remove_stale_temporaries(folder / f"{split}-*{suffix}")  # of a build that was killed

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def _temporary(self, index: int) -> Path:
        return temporary_path(shard_path(self.folder, self.split, index, self.suffix))

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.sizes[-1] == self.shard_tokens:
                self.close()
                self._file = open(self._temporary(len(self.sizes)), "wb")
                self.sizes.append(0)
            take = min(len(tokens), self.shard_tokens - self.sizes[-1])
            tokens[:take].tofile(self._file)
            self.sizes[-1] += take
            tokens = tokens[take:]

    def copy_from(self, file, n: int) -> None:
        """Append the next ``n`` tokens of ``file``, a block at a time: memory stays bounded."""
        while n > 0:
            tokens = np.fromfile(file, dtype=self.dtype, count=min(n, READ_BLOCK // self.dtype.itemsize))
            if not len(tokens):
                raise OSError(f"{file.name} ended {n} tokens early")
            self.write(tokens)
            n -= len(tokens)

    def close(self) -> None:
        """Flush the open shard to disk."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def commit(self) -> list[int]:
        """Rename the (closed) shards into place, delete those of a previous, longer build; return their sizes."""
        paths = [shard_path(self.folder, self.split, index, self.suffix) for index in range(len(self.sizes))]
        for index, path in enumerate(paths):
            os.replace(self._temporary(index), path)
        for old in set(self.folder.glob(f"{self.split}-*{self.suffix}")) - set(paths):
            old.unlink()
        return self.sizes

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        for index in range(len(self.sizes)):
            self._temporary(index).unlink(missing_ok=True)


def iter_batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_document_ids(
    source: Source, jsonl_field: str, tokenizer: Tokenizer, dtype: np.dtype, seen: Callable[[str], None]
) -> Iterator[np.ndarray]:
    """The token ids of each document of ``source``, in pieces: the tokenizer's beginning-of-text token (if it
    adds one), the text's ids, end-of-text. ``seen`` is called with each piece of text before it is encoded.
    Training's token cache and ``evaluate`` read a corpus through this one rule."""
    eot, bos = end_of_text(tokenizer), begin_of_text(tokenizer)
    # A sentencepiece-style tokenizer puts "▁" before every text it encodes: only a document's first piece gets it.
    continuation = continuation_tokenizer(tokenizer)
    for doc in iter_documents(source, jsonl_field):
        if isinstance(doc, Conversation):
            raise mixed_corpus_error(doc.where, conversations=False)
        if bos is not None:
            yield np.asarray([bos], dtype=dtype)
        first = True
        for batch in iter_batches(doc, _ENCODE_BATCH):
            for text in batch:
                seen(text)
            encodings = continuation.encode_batch(batch, add_special_tokens=False)
            if first and continuation is not tokenizer:
                encodings[0] = tokenizer.encode(batch[0], add_special_tokens=False)
            first = False
            yield np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encodings])
        yield np.asarray([eot], dtype=dtype)


def iter_conversation_ids(
    source: Source, jsonl_field: str, tokenizer: Tokenizer, template: ChatTemplate, dtype: np.dtype, seen: Callable[[str], None]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The token ids of each conversation of ``source`` rendered with ``template``, and per token whether it is a
    training target (the assistant's: 1) or context (0). ``seen`` is called with each rendered conversation."""

    def rendered() -> Iterator[tuple[str, list[tuple[int, int]]]]:
        for doc in iter_documents(source, jsonl_field):
            if not isinstance(doc, Conversation):
                raise mixed_corpus_error(source.path, conversations=True)
            try:
                text, spans = template.render_with_spans(doc.messages)
            except ChatError as e:
                raise ChatError(f"{doc.where}: {e}") from None
            seen(text)
            yield text, spans

    for batch in iter_batches(rendered(), _ENCODE_BATCH):
        encodings = tokenizer.encode_batch([text for text, _ in batch], add_special_tokens=False)
        for (_, spans), encoding in zip(batch, encodings):
            yield np.asarray(encoding.ids, dtype=dtype), np.asarray(span_mask(encoding.offsets, spans), dtype=np.uint8)


def _split_conversations(
    starts: list[int], n: int, n_val: int, n_test: int, tokens, masks, writers: dict, mask_writers: dict, start_writers: dict
) -> None:
    """Copy one source's conversations (``n`` tokens from the scratch files ``tokens`` and ``masks``) into the splits,
    each split starting at the first conversation that begins at or after its share of tokens: no conversation is cut."""
    bounds = np.asarray([*starts, n], dtype=np.int64)

    def boundary(at: int) -> int:
        return int(bounds[np.searchsorted(bounds, at)])

    test_at, val_at = boundary(n - n_val - n_test), boundary(n - n_val)
    for split, begin, end in (("train", 0, test_at), (TEST, test_at, val_at), ("val", val_at, n)):
        if split not in writers:
            continue
        inside = bounds[:-1][(bounds[:-1] >= begin) & (bounds[:-1] < end)]
        start_writers[split].write(inside - begin + writers[split].total)
        writers[split].copy_from(tokens, end - begin)
        mask_writers[split].copy_from(masks, end - begin)


def tokenize_corpus(
    sources,
    jsonl_field,
    tokenizer,
    val_fraction,
    folder: Path,
    shard_tokens: int,
    test_fraction: float = 0.0,
    template: ChatTemplate | None = None,
) -> dict:
    """Tokenize every source into the shard files of ``folder``; return the meta that describes them.

    Each source's documents are joined with end-of-text tokens (and each starts with the tokenizer's
    beginning-of-text token, if it adds one), and its last ``val_fraction`` of tokens goes to validation,
    so the split is deterministic and never overlaps training; with ``test_fraction``, the
    ``test_fraction`` of tokens before them goes to the test split.

    With ``template``, the corpus is conversations: each is rendered with it and tokenized as a whole, a mask
    beside the tokens marks the assistant's, the splits are cut between conversations, and each split lists
    where its conversations start.
    """
    eot = end_of_text(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    remove_stale_temporaries(folder / "source")
    remove_stale_temporaries(folder / "source.mask")
    scratch_path, mask_path = temporary_path(folder / "source"), temporary_path(folder / "source.mask")
    splits = split_names(test_fraction)
    writers = {split: ShardWriter(folder, split, shard_tokens, dtype) for split in splits}
    if template is not None:
        mask_writers = {split: ShardWriter(folder, split, shard_tokens, np.dtype(np.uint8), MASK) for split in splits}
        start_writers = {split: ShardWriter(folder, split, shard_tokens, np.dtype(np.int64), STARTS) for split in splits}
        every_writer = [*writers.values(), *mask_writers.values(), *start_writers.values()]
    else:
        every_writer = list(writers.values())
    corpus_hash = hashlib.sha256()
    has_text = False
    total_bytes = sum(s.size for s in sources)
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=total_bytes < 64 << 20, file=sys.stderr)

    def seen(text: str) -> None:
        nonlocal has_text
        data = text.encode("utf-8")
        corpus_hash.update(data)
        progress.update(len(data))
        has_text = has_text or (bool(text) and not text.isspace())

    try:
        for source in sources:
            if template is not None:
                n, starts = 0, []
                with open(scratch_path, "wb") as scratch, open(mask_path, "wb") as masks:
                    for ids, mask in iter_conversation_ids(source, jsonl_field, tokenizer, template, dtype, seen):
                        starts.append(n)
                        ids.tofile(scratch)
                        mask.tofile(masks)
                        n += len(ids)
                n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
                with open(scratch_path, "rb") as scratch, open(mask_path, "rb") as masks:
                    _split_conversations(starts, n, n_val, n_test, scratch, masks, writers, mask_writers, start_writers)
                continue
            # A source's tokens go to a scratch file first: the split point is known only at its end.
            n = 0
            with open(scratch_path, "wb") as scratch:
                for ids in iter_document_ids(source, jsonl_field, tokenizer, dtype, seen):
                    ids.tofile(scratch)
                    n += len(ids)
            n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
            with open(scratch_path, "rb") as scratch:
                writers["train"].copy_from(scratch, n - n_val - n_test)
                if n_test:
                    writers[TEST].copy_from(scratch, n_test)
                writers["val"].copy_from(scratch, n_val)
            if n_val or n_test:  # the training part stops mid-document: close it, so the next source starts clean
                writers["train"].write(np.asarray([eot], dtype=dtype))
        for writer in every_writer:
            writer.close()
        (folder / "meta.json").unlink(missing_ok=True)  # from here until the new meta lands, the cache reads as absent
        shards = {split: writer.commit() for split, writer in writers.items()}
        conversations = {}
        if template is not None:
            for split in splits:
                mask_writers[split].commit()
                conversations[f"{split}_conversations"] = sum(start_writers[split].commit())
                conversations[f"{split}_start_shards"] = start_writers[split].sizes
        return {
            **{f"{split}_tokens": sum(sizes) for split, sizes in shards.items()},
            **{f"{split}_shards": sizes for split, sizes in shards.items()},
            **conversations,
            "dtype": dtype.name,
            "corpus_sha256": corpus_hash.hexdigest(),
            "has_text": has_text,
        }
    except OSError as e:  # a full disk, mostly; the files it read or wrote are named when known
        where = f" ({e.filename})" if e.filename else ""
        why = f"{e.strerror or e}{where}"
        raise WriteError(f"cannot build the token cache in {folder}: {why}; the previous cache is intact") from e
    finally:
        progress.close()
        for writer in every_writer:
            writer.discard()
        scratch_path.unlink(missing_ok=True)
        mask_path.unlink(missing_ok=True)


def _map_tokens(path: str, n: int, dtype: str, random_access: bool) -> np.ndarray:
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=n)


class TokenShards:
    """One split of the token cache: its shard files, read as one sequence of tokens.

    Pickled as file names, so DataLoader workers map the files themselves whatever the start method
    (a pickled ``np.memmap`` is copied into memory whole).
    """

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.sizes = np.array([len(s) for s in shards], dtype=np.int64)
        self.starts = np.cumsum(self.sizes) - self.sizes
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)
        self._files: tuple | None = None

    @classmethod
    def open(cls, paths: list[str], sizes: list[int], dtype: str, random_access: bool = False) -> TokenShards:
        """Map the shard files read-only. ``random_access``: ask the kernel not to read ahead, which
        for random windows reads ~128 KB of a corpus on disk for every few hundred bytes used."""
        tokens = cls([_map_tokens(p, n, dtype, random_access) for p, n in zip(paths, sizes)])
        tokens._files = ([str(p) for p in paths], list(sizes), np.dtype(dtype).name, random_access)
        return tokens

    def __getstate__(self) -> dict:
        return {"files": self._files} if self._files else self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(TokenShards.open(*state["files"]).__dict__ if "files" in state else state)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:].astype(dtype or self.dtype, copy=False)

    def __getitem__(self, key: slice) -> np.ndarray:
        """Tokens ``[start, stop)``, read across shard boundaries (step 1 only)."""
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards reads contiguous ranges only")
        parts = []
        index = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            local = start - int(self.starts[index])
            take = min(stop - start, int(self.sizes[index]) - local)
            parts.append(self.shards[index][local : local + take])
            start += take
            index += 1
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ``tokens[s : s + length]`` for ``s`` in ``starts``: one vectorised gather per shard;
        the rare window across a shard boundary is read piecewise."""
        index = np.searchsorted(self.starts, starts, side="right") - 1
        local = starts - self.starts[index]
        inside = local + length <= self.sizes[index]
        out = np.empty((len(starts), length), dtype=self.dtype)
        offsets = np.arange(length)
        for shard in np.unique(index[inside]):
            rows = np.flatnonzero(inside & (index == shard))
            out[rows] = self.shards[shard][local[rows, None] + offsets]
        for row in np.flatnonzero(~inside):
            out[row] = self[int(starts[row]) : int(starts[row]) + length]
        return out



@dataclass(frozen=True)
class Conversations:
    """One split of a conversation corpus, beside its tokens: which tokens are training targets, and where each
    conversation starts (``starts[i]`` to ``starts[i + 1]``; the split's end is the last entry)."""

    mask: TokenShards
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1


@dataclass(frozen=True)
class TokenCache:
    """The token cache of one corpus under one tokenizer: where it lives, whether it is valid, how it is built.

    A cache is valid when its ``meta.json`` matches the sources (paths, sizes, modification times), the
    tokenizer's hash and the settings it was built with, and every shard file it lists is there, whole.
    """

    path: str | None
    """The corpus (``data.path``); ``None`` is the built-in corpus."""
    cache_dir: Path
    tokenizer_path: str | None
    vocab_size: int
    val_fraction: float
    jsonl_field: str
    tokenizer_sample_bytes: int
    shard_tokens: int
    test_fraction: float = 0.0

    @property
    def splits(self) -> tuple[str, ...]:
        return split_names(self.test_fraction)

    @property
    def _split_settings(self) -> dict:
        # test_fraction is recorded only when set: caches built before it existed stay valid.
        return {"val_fraction": self.val_fraction, **({"test_fraction": self.test_fraction} if self.test_fraction else {})}

    @property
    def folder(self) -> Path:
        """The cache folder of this corpus (the same whatever the tokenizer or split)."""
        key = hashlib.sha256(json.dumps(self.path or BUILTIN_CORPUS).encode()).hexdigest()[:12]
        name = "builtin" if self.path is None else Path(self.path.rstrip("/*")).name or "corpus"
        return self.cache_dir / f"{name}-{key}"

    @property
    def where(self) -> str:
        """The corpus, as error messages name it."""
        return "the built-in corpus" if self.path is None else f"data.path {self.path!r}"

    def _expected_meta(self, sources: list[Source], tokenizer: Tokenizer, template: ChatTemplate | None) -> dict:
        builtin = {"python": sys.version.split()[0]} if self.path is None else {}
        return {
            "format": CACHE_FORMAT,
            "sources": [s.fingerprint for s in sources],
            "jsonl_field": self.jsonl_field,
            "tokenizer": tokenizer_hash(tokenizer),
            "chat_template": template.source if template is not None else None,
            **self._split_settings,
            **builtin,
        }

    def _tokenizer(self, sources: list[Source]) -> Tokenizer:
        """Load ``tokenizer_path``, or reuse / train the corpus's own tokenizer."""
        if self.tokenizer_path:
            return tokenizer_of(self.tokenizer_path)  # a tokenizer file, a folder or a .ckpt (model.init_from)
        path = self.folder / "tokenizer.json"
        wanted = {
            "sources": [s.fingerprint for s in sources],
            "vocab_size": self.vocab_size,
            "jsonl_field": self.jsonl_field,
            "sample_bytes": self.tokenizer_sample_bytes,
            "special_tokens": SPECIAL_TOKENS,  # a tokenizer trained before the chat markers were added is trained again
            **self._split_settings,
        }
        if _read_json(self.folder / "tokenizer.meta.json") == wanted and path.is_file():
            return load_tokenizer(path)
        sample = iter_sample(sources, self.jsonl_field, self.tokenizer_sample_bytes, 1 - self.val_fraction - self.test_fraction)
        tokenizer = train_tokenizer(sample, self.vocab_size)
        (self.folder / "tokenizer.meta.json").unlink(missing_ok=True)
        save_tokenizer(tokenizer, path)
        atomic_write_text(self.folder / "tokenizer.meta.json", json.dumps(wanted), "token cache metadata")
        return tokenizer

    def _files_whole(self, meta: dict) -> bool:
        """Every shard file the meta lists is there, of the size it lists."""
        itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
        for split in self.splits:
            sizes = meta.get(f"{split}_shards")
            if not isinstance(sizes, list) or sum(sizes) != meta.get(f"{split}_tokens"):
                return False
            streams = [(".bin", sizes, itemsize)]
            if meta.get("chat_template") is not None:
                starts = meta.get(f"{split}_start_shards")
                if not isinstance(starts, list) or sum(starts) != meta.get(f"{split}_conversations"):
                    return False
                streams += [(MASK, sizes, 1), (STARTS, starts, 8)]
            for suffix, stream_sizes, size in streams:
                for index, n in enumerate(stream_sizes):
                    path = shard_path(self.folder, split, index, suffix)
                    if not path.is_file() or path.stat().st_size != n * size:
                        return False
        return True

    def _contents_consistent(self, meta: dict, tokenizer: Tokenizer) -> bool:
        """What is cheap to check of the contents: the tokenizer the meta holds is the one it names, a corpus said to
        hold no text gets tokenized again (cheap, if it is so), and every token id is inside the vocabulary (a
        vectorised max over the shards: about 0.03 s per 100 MB of cache in the page cache)."""
        if meta.get("tokenizer_json") != tokenizer.to_str() or meta.get("has_text") is not True:
            return False
        vocab_size = tokenizer.get_vocab_size()
        for split in self.splits:
            for index, n in enumerate(meta[f"{split}_shards"]):
                if n and int(_map_tokens(str(shard_path(self.folder, split, index)), n, meta["dtype"], False).max()) >= vocab_size:
                    return False
        return True

    def build(self) -> dict:
        """Train or load the tokenizer and tokenize the corpus, unless a valid cache exists; its meta."""
        sources = resolve_sources(self.path)
        with file_lock(self.folder / ".lock"):  # one builder at a time when two runs start at once
            tokenizer = self._tokenizer(sources)
            conversations = is_conversation_corpus(sources, self.jsonl_field)
            template = training_template(self.tokenizer_path, tokenizer) if conversations else None
            expected = self._expected_meta(sources, tokenizer, template)
            meta = _read_json(self.folder / "meta.json")
            stale = meta is None or {k: meta.get(k) for k in expected} != expected
            # A cache built with a test split, asked for none: expected_meta has no test_fraction key to compare.
            if (
                stale
                or meta.get("test_fraction", 0.0) != self.test_fraction
                or not self._files_whole(meta)
                or not self._contents_consistent(meta, tokenizer)
            ):
                built = tokenize_corpus(
                    sources, self.jsonl_field, tokenizer, self.val_fraction, self.folder, self.shard_tokens,
                    self.test_fraction, template,
                )
                meta = {**expected, **built, "tokenizer_json": tokenizer.to_str()}
                atomic_write_text(self.folder / "meta.json", json.dumps(meta), "token cache metadata")
        return meta

    def open(self) -> tuple[dict, Tokenizer, dict[str, TokenShards], dict[str, Conversations]]:
        """The meta, tokenizer and token splits of the cache that ``build`` made, and for a conversation corpus
        each split's :class:`Conversations` (else no entries)."""
        meta = _read_json(self.folder / "meta.json")
        if meta is None or not self._files_whole(meta):
            raise DataError(f"no complete token cache in {self.folder}; run prepare_data() first (the Trainer does)")
        tokenizer = tokenizer_from_str(meta["tokenizer_json"], source=str(self.folder / "meta.json"))
        if tokenizer_hash(tokenizer) != meta.get("tokenizer"):
            raise DataError(f"the token cache in {self.folder} holds another tokenizer than its meta.json names; delete the folder to rebuild it")
        def stream(split: str, suffix: str, sizes: list[int], dtype: str) -> TokenShards:
            paths = [shard_path(self.folder, split, i, suffix) for i in range(len(sizes))]
            return TokenShards.open(paths, sizes, dtype, random_access=split == "train")  # random windows; validation reads in order

        splits = {split: stream(split, ".bin", meta[f"{split}_shards"], meta["dtype"]) for split in self.splits}
        conversations = {}
        if meta.get("chat_template") is not None:
            for split in self.splits:
                mask = stream(split, MASK, meta[f"{split}_shards"], "uint8")
                starts = np.asarray(stream(split, STARTS, meta[f"{split}_start_shards"], "int64"))
                conversations[split] = Conversations(mask, np.append(starts, len(splits[split])))
        return meta, tokenizer, splits, conversations

    def check_long_enough(self, meta: dict, block_size: int) -> None:
        """Refuse a corpus without text, or with a split shorter than one window (without a conversation)."""
        if not meta["has_text"]:
            raise DataError(f"{self.where} holds no text (empty or whitespace only); point data.path at a non-empty corpus")
        if meta.get("chat_template") is not None:
            for split in self.splits:
                if not meta[f"{split}_conversations"]:
                    raise DataError(
                        f"{self.where} is too short: its {split} split has no conversation; use more conversations"
                        + (f", or a larger data.{split}_fraction" if split != "train" else "")
                    )
            return
        need = block_size + 1
        for split in self.splits:
            if meta[f"{split}_tokens"] < need:
                raise DataError(
                    f"{self.where} is too short: its {split} split has {meta[f'{split}_tokens']} tokens, fewer than one "
                    f"window of block_size + 1 = {need}; use more text, a smaller model.block_size"
                    + (f", or a larger data.{split}_fraction" if split != "train" else "")
                )
