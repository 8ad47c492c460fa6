"""From raw text to batches: corpus sources, the token cache, datasets and ``TextDataModule``.

The pipeline runs once per corpus and tokenizer (``prepare_data``): read the sources, train or load
the tokenizer, tokenize in parallel batches, and write the memory-mapped token files of each split
(train and validation; shards of at most ``shard_tokens`` tokens) with a ``meta.json`` that says
exactly what they were built from. Training then reads ``(batch_size, block_size + 1)`` windows
straight out of the memmaps, so memory does not grow with the corpus.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from lm_lightning.files import WriteError, atomic_write_text, file_lock, remove_stale_temporaries, temporary_path
from lm_lightning.tokenizer import (
    EOT,
    iter_batches,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    tokenizer_from_str,
    tokenizer_hash,
    train_tokenizer,
)

BUILTIN_CORPUS = "builtin:pydoc_data"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
CACHE_FORMAT = 2
_READ_BLOCK = 8 << 20  # bytes read at a time: bounded memory whatever the file size
_PIECE_CHARS = 16 << 10  # characters per piece of text handed to the tokenizer
_ENCODE_BATCH = 256  # pieces per encode_batch call (tokenizers encodes a batch on all cores)


def cache_root() -> Path:
    """Where tokenizers, token caches and compiled kernels are kept: ``$LM_LIGHTNING_CACHE`` or ``~/.cache/lm_lightning``."""
    return Path(os.path.expanduser(os.environ.get("LM_LIGHTNING_CACHE", "~/.cache/lm_lightning")))


class DataError(ValueError):
    """Bad corpus or data configuration; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Sources: where the text comes from, read as a stream of documents.


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
            str(p) for p in Path(expanded).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
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


def _decode(block: bytes, path: str, offset: int) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8: undecodable byte 0x{block[e.start]:02x} at byte offset {offset + e.start}; "
            "convert it (e.g. iconv -f GB18030 -t UTF-8) or remove it from data.path"
        ) from None


def _read_blocks(path: str) -> Iterator[str]:
    """Stream a text file as decoded blocks of about ``_READ_BLOCK`` bytes, each cut at a line end."""
    offset = 0
    rest = b""
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
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


def _read_jsonl_documents(path: str, field: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno} is not JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(
                f"{path} line {lineno} has no string {field!r} field; set data.jsonl_field to the field that holds the text"
            )
        yield record[field]


def iter_documents(source: Source, jsonl_field: str) -> Iterator[Iterable[str]]:
    """Yield each document of ``source`` as an iterable of text pieces (a text file's lines)."""
    if source.path.startswith(BUILTIN_CORPUS):
        yield [dict(_builtin_topics())[source.path.split("/", 1)[1]]]
    elif source.path.lower().endswith(".jsonl"):
        for doc in _read_jsonl_documents(source.path, jsonl_field):
            yield [doc]
    else:
        yield _read_pieces(source.path)


def iter_sample(sources: list[Source], jsonl_field: str, max_bytes: int, train_fraction: float) -> Iterator[str]:
    """Text to train the tokenizer on: the training part of every source (its first ``train_fraction``
    of bytes: validation text must not shape the vocabulary it is scored with), at most ``max_bytes``
    in all, shared equally between sources, so a huge corpus trains its tokenizer in bounded time."""
    share = max(1, max_bytes // len(sources))
    for source in sources:
        left = min(share, int(source.size * train_fraction))
        for doc in iter_documents(source, jsonl_field):
            for piece in doc:
                data = piece.encode("utf-8")
                if len(data) >= left:
                    yield data[:left].decode("utf-8", errors="ignore")
                    left = 0
                    break
                left -= len(data)
                yield piece
            if left <= 0:
                break


# --------------------------------------------------------------------------------------------
# Token cache: shard files of each split (memmaps) + meta.json, written atomically under a lock.


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_path(folder: Path, split: str, index: int) -> Path:
    return folder / f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends a split's tokens to shard files of at most ``shard_tokens`` tokens each, under temporary
    names until ``commit`` renames them all into place."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.sizes: list[int] = []
        self._file = None
        remove_stale_temporaries(folder / f"{split}-*.bin")  # of a build that was killed

    def _temporary(self, index: int) -> Path:
        return temporary_path(shard_path(self.folder, self.split, index))

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
            tokens = np.fromfile(file, dtype=self.dtype, count=min(n, _READ_BLOCK // self.dtype.itemsize))
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
        paths = [shard_path(self.folder, self.split, index) for index in range(len(self.sizes))]
        for index, path in enumerate(paths):
            os.replace(self._temporary(index), path)
        for old in set(self.folder.glob(f"{self.split}-*.bin")) - set(paths):
            old.unlink()
        return self.sizes

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        for index in range(len(self.sizes)):
            self._temporary(index).unlink(missing_ok=True)


def tokenize_corpus(sources, jsonl_field, tokenizer, val_fraction, folder: Path, shard_tokens: int) -> dict:
    """Tokenize every source into the shard files of ``folder``; return the meta that describes them.

    Each source's documents are joined with end-of-text tokens, and its last ``val_fraction`` of
    tokens goes to validation, so the split is deterministic and never overlaps training.
    """
    eot = tokenizer.token_to_id(EOT)
    dtype = token_dtype(tokenizer.get_vocab_size())
    remove_stale_temporaries(folder / "source")
    scratch_path = temporary_path(folder / "source")
    writers = {split: ShardWriter(folder, split, shard_tokens, dtype) for split in ("train", "val")}
    corpus_hash = hashlib.sha256()
    has_text = False
    total_bytes = sum(s.size for s in sources)
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=total_bytes < 64 << 20, file=sys.stderr)
    try:
        for source in sources:
            # A source's tokens go to a scratch file first: the split point is known only at its end.
            n = 0
            with open(scratch_path, "wb") as scratch:
                for doc in iter_documents(source, jsonl_field):
                    for batch in iter_batches(doc, _ENCODE_BATCH):
                        for text in batch:
                            data = text.encode("utf-8")
                            corpus_hash.update(data)
                            progress.update(len(data))
                            has_text = has_text or (bool(text) and not text.isspace())
                        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
                        ids = np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encodings])
                        ids.tofile(scratch)
                        n += len(ids)
                    np.asarray([eot], dtype=dtype).tofile(scratch)
                    n += 1
            n_val = int(round(n * val_fraction))
            with open(scratch_path, "rb") as scratch:
                writers["train"].copy_from(scratch, n - n_val)
                writers["val"].copy_from(scratch, n_val)
            if n_val:  # the training part stops mid-document: close it, so the next source starts clean
                writers["train"].write(np.asarray([eot], dtype=dtype))
        for writer in writers.values():
            writer.close()
        (folder / "meta.json").unlink(missing_ok=True)  # from here until the new meta lands, the cache reads as absent
        shards = {split: writer.commit() for split, writer in writers.items()}
        return {
            **{f"{split}_tokens": sum(sizes) for split, sizes in shards.items()},
            **{f"{split}_shards": sizes for split, sizes in shards.items()},
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
        for writer in writers.values():
            writer.discard()
        scratch_path.unlink(missing_ok=True)


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


# --------------------------------------------------------------------------------------------
# Datasets and the sampler.


class TrainWindows(Dataset):
    """Random ``(batch_size, block_size + 1)`` windows of the training tokens, one batch per index.

    Batch ``(epoch, i)`` is a pure function of ``(seed, rank, epoch, i)``: resuming at batch ``i``
    gives exactly the batches an uninterrupted run would have seen, whatever ``num_workers`` is.
    """

    def __init__(self, tokens: TokenShards, block_size: int, batch_size: int, seed: int, rank: int = 0):
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        rng = np.random.default_rng([self.seed, self.rank, epoch, i])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        return torch.from_numpy(self.tokens.windows(starts, self.block_size + 1).astype(np.int64))


class ResumableSampler(Sampler):
    """Yields batch keys ``(epoch, i)`` for ``i`` in ``[0, num_batches)``; Lightning sets the epoch.

    After ``resume_at(epoch, start)``, passes over that epoch start at batch ``start``; the next epoch is whole.
    The resume point is not used up by a first ``iter()``: a DataLoader with workers calls it twice per pass.
    """

    def __init__(self, num_batches: int, epoch: int = 0):
        self.num_batches = num_batches
        self.epoch = epoch
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, start)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # The epoch is read now, not per item: workers fetch keys ahead of Lightning's set_epoch.
        epoch = self.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        return ((epoch, i) for i in range(start, self.num_batches))


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints (it has ``state_dict``), so a resumed run continues mid-epoch.

    ``consumed`` reports how many batches of the current epoch the training loop has finished; the
    loader itself cannot count them, as workers and Lightning's fetcher read ahead. Its state names the
    next batch to train on, so it does not depend on ``num_workers``.
    """

    def __init__(self, *args, consumed: Callable[[], int] = lambda: 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed = consumed

    def state_dict(self) -> dict[str, int]:
        epoch, consumed = self.sampler.epoch, int(self._consumed())
        if consumed >= self.sampler.num_batches:  # saved at the end of an epoch: the next one starts from 0
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(state["epoch"], state["consumed"])


class ValWindows(Dataset):
    """Consecutive, non-overlapping windows over the validation tokens; this rank's share of them.

    Window ``k`` starts at ``k * block_size``, so every token after the first is a target exactly
    once. Rank ``r`` of ``w`` takes windows ``r, r + w, ...``: no duplicates, no gaps.
    """

    def __init__(self, tokens: TokenShards, block_size: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.block_size = block_size
        self.windows = range(rank, (len(tokens) - 1) // block_size, world_size)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.windows[i] * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))


# --------------------------------------------------------------------------------------------
# The DataModule.


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        val_batch_size: int | None = None,
        jsonl_field: str = "text",
        tokenizer_sample_bytes: int = 100_000_000,
        shard_tokens: int = 100_000_000,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 1337,
    ):
        """Text in, token batches out.

        Args:
            path: A UTF-8 text file, a folder (searched recursively for .txt, .md and .jsonl files) or a
                glob. Unset: the built-in corpus, Python's reference documentation from ``pydoc_data``.
            tokenizer_path: A ``tokenizer.json`` to use. Unset: train a byte-level BPE on the corpus.
            vocab_size: Size of the tokenizer to train (ignored with ``tokenizer_path``); 257 is bytes only.
            block_size: Tokens of context per training window (linked to ``model.block_size``).
            batch_size: Windows per training batch.
            val_fraction: The last fraction of each source's tokens, held out for validation.
            val_batch_size: Windows per validation batch. Unset: ``batch_size``.
            jsonl_field: The field of each .jsonl record that holds its text.
            tokenizer_sample_bytes: Bytes of the corpus the tokenizer is trained on (shared equally between
                files, from their training parts only); the whole corpus is tokenized with it.
            shard_tokens: Tokens per file of the token cache (200 MB at the default and a vocabulary of
                up to 65536): a larger corpus is cached in several files, which copy, sync and upload
                one at a time.
            cache_dir: Where tokenizers and token caches are kept. Unset: ``$LM_LIGHTNING_CACHE``, else
                ``~/.cache/lm_lightning``.
            num_workers: DataLoader worker processes (0 reads in the training process).
            seed: Seed of the random training windows.
        """
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("shard_tokens", shard_tokens)):
            if value < 1:
                raise DataError(f"data.{name}={value} must be a positive integer")
        self.save_hyperparameters()
        self.path = path
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_fraction = val_fraction
        self.jsonl_field = jsonl_field
        self.tokenizer_sample_bytes = tokenizer_sample_bytes
        self.shard_tokens = shard_tokens
        self.cache_dir = Path(os.path.expanduser(cache_dir)) if cache_dir else cache_root()
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = None
        self.meta: dict = {}

    # --- where things live ---------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """The cache folder of this corpus (the same whatever the tokenizer or split)."""
        key = hashlib.sha256(json.dumps(self.path or BUILTIN_CORPUS).encode()).hexdigest()[:12]
        name = "builtin" if self.path is None else Path(self.path.rstrip("/*")).name or "corpus"
        return self.cache_dir / f"{name}-{key}"

    def _expected_meta(self, sources: list[Source], tokenizer) -> dict:
        builtin = {"python": sys.version.split()[0]} if self.path is None else {}
        return {
            "format": CACHE_FORMAT,
            "sources": [s.fingerprint for s in sources],
            "jsonl_field": self.jsonl_field,
            "tokenizer": tokenizer_hash(tokenizer),
            "val_fraction": self.val_fraction,
            **builtin,
        }

    # --- prepare_data: once per node ------------------------------------------------------

    def _tokenizer(self, sources: list[Source]):
        """Load ``tokenizer_path``, or reuse / train the corpus's own tokenizer."""
        if self.tokenizer_path:
            return load_tokenizer(self.tokenizer_path)
        path = self.folder / "tokenizer.json"
        wanted = {
            "sources": [s.fingerprint for s in sources],
            "vocab_size": self.vocab_size,
            "jsonl_field": self.jsonl_field,
            "sample_bytes": self.tokenizer_sample_bytes,
            "val_fraction": self.val_fraction,
        }
        if _read_json(self.folder / "tokenizer.meta.json") == wanted and path.is_file():
            return load_tokenizer(path)
        sample = iter_sample(sources, self.jsonl_field, self.tokenizer_sample_bytes, 1 - self.val_fraction)
        tokenizer = train_tokenizer(sample, self.vocab_size)
        (self.folder / "tokenizer.meta.json").unlink(missing_ok=True)
        save_tokenizer(tokenizer, path)
        atomic_write_text(self.folder / "tokenizer.meta.json", json.dumps(wanted), "token cache metadata")
        return tokenizer

    def prepare_data(self) -> None:
        """Train or load the tokenizer and build the token cache, unless a matching one exists."""
        sources = resolve_sources(self.path)
        with file_lock(self.folder / ".lock"):  # one builder at a time when two runs start at once
            tokenizer = self._tokenizer(sources)
            expected = self._expected_meta(sources, tokenizer)
            meta = _read_json(self.folder / "meta.json")
            if meta is None or {k: meta.get(k) for k in expected} != expected or not self._bins_match(meta):
                built = tokenize_corpus(sources, self.jsonl_field, tokenizer, self.val_fraction, self.folder, self.shard_tokens)
                meta = {**expected, **built, "tokenizer_json": tokenizer.to_str()}
                atomic_write_text(self.folder / "meta.json", json.dumps(meta), "token cache metadata")
        self._check_sizes(meta)

    def _bins_match(self, meta: dict) -> bool:
        """Every shard file the meta lists is there, whole."""
        itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
        for split in ("train", "val"):
            sizes = meta.get(f"{split}_shards")
            if not isinstance(sizes, list) or sum(sizes) != meta.get(f"{split}_tokens"):
                return False
            for index, n in enumerate(sizes):
                path = shard_path(self.folder, split, index)
                if not path.is_file() or path.stat().st_size != n * itemsize:
                    return False
        return True

    def _check_sizes(self, meta: dict) -> None:
        where = "the built-in corpus" if self.path is None else f"data.path {self.path!r}"
        if not meta["has_text"]:
            raise DataError(f"{where} holds no text (empty or whitespace only); point data.path at a non-empty corpus")
        need = self.block_size + 1
        for split in ("train", "val"):
            if meta[f"{split}_tokens"] < need:
                raise DataError(
                    f"{where} is too short: its {split} split has {meta[f'{split}_tokens']} tokens, fewer than one "
                    f"window of block_size + 1 = {need}; use more text, a smaller model.block_size"
                    + (", or a larger data.val_fraction" if split == "val" else "")
                )

    # --- setup: every process ---------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        meta = _read_json(self.folder / "meta.json")
        if meta is None or not self._bins_match(meta):
            raise DataError(f"no complete token cache in {self.folder}; run prepare_data() first (the Trainer does)")
        self._check_sizes(meta)
        self.meta = meta
        self.tokenizer = tokenizer_from_str(meta["tokenizer_json"], source=str(self.folder / "meta.json"))
        self.tokens = {
            split: TokenShards.open(
                [shard_path(self.folder, split, i) for i in range(len(meta[f"{split}_shards"]))],
                meta[f"{split}_shards"],
                meta["dtype"],
                random_access=split == "train",  # random windows; validation reads in order
            )
            for split in ("train", "val")
        }

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_byte_lengths(self) -> torch.Tensor:
        """UTF-8 bytes per token id, for bits-per-byte."""
        return torch.tensor([len(b) for b in token_bytes(self.tokenizer)], dtype=torch.long)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self) -> dict:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # A generator of its own: a DataLoader otherwise draws its workers' base seed from the global torch RNG
        # each time it starts iterating, so dropout masks would depend on num_workers and on validation.
        generator = torch.Generator().manual_seed(self.seed)
        return dict(num_workers=self.num_workers, pin_memory=on_gpu, persistent_workers=self.num_workers > 0, generator=generator)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank_world()
        tokens = self.tokens["train"]
        dataset = TrainWindows(tokens, self.block_size, self.batch_size, self.seed, rank)
        trainer = self.trainer
        if trainer is not None and trainer.max_steps > 0:
            # Training is step-based: one "epoch" is the whole run, so the progress bar counts steps.
            num_batches = trainer.max_steps * trainer.accumulate_grad_batches
        else:  # an epoch draws as many windows as the split has tokens
            num_batches = max(1, len(tokens) // (self.batch_size * self.block_size))

        def consumed() -> int:
            # Batches of this epoch the fit loop has finished (the progress Lightning restores on resume).
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

        sampler = ResumableSampler(num_batches, epoch=trainer.current_epoch if trainer is not None else 0)
        return ResumableLoader(dataset, sampler=sampler, batch_size=None, consumed=consumed, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = ValWindows(self.tokens["val"], self.block_size, rank, world)
        return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
