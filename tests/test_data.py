import json
import os
import pickle

import numpy as np
import pytest
import torch

from lm_lightning.data import DataError, TextDataModule
from lm_lightning.data.cache import TokenShards
from lm_lightning.data.corpus import resolve_sources
from lm_lightning.data.windows import ResumableSampler, TrainWindows, ValWindows
from lm_lightning.tokenizer import EOT, save_tokenizer, train_tokenizer

from conftest import BAD_CORPORA, CHINESE, english_text


def prepared(path, **kwargs) -> TextDataModule:
    dm = TextDataModule(path=str(path) if path else None, **{"vocab_size": 300, "block_size": 16, "batch_size": 4, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_file_folder_and_glob_sources(tmp_path):
    folder = tmp_path / "texts"
    (folder / "deep").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha " * 50)
    (folder / "deep" / "b.md").write_text("beta " * 50)
    (folder / "deep" / "c.jsonl").write_text(json.dumps({"text": "gamma " * 50}) + "\n")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    names = lambda sources: sorted(os.path.basename(s.path) for s in sources)  # noqa: E731
    assert names(resolve_sources(str(folder))) == ["a.txt", "b.md", "c.jsonl"]
    assert names(resolve_sources(str(folder / "a.txt"))) == ["a.txt"]
    assert names(resolve_sources(str(folder / "**" / "*.md"))) == ["b.md"]
    assert len(resolve_sources(None)) > 50 and resolve_sources(None)[0].path.startswith("builtin:pydoc_data/")


def test_documents_are_separated_by_end_of_text_and_split_per_source(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    records = [{"text": f"document number {i}. " * 20} for i in range(10)]
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (folder / "plain.txt").write_text(english_text(5_000))
    dm = prepared(folder, val_fraction=0.2)
    eot = dm.tokenizer.token_to_id(EOT)
    train, val = np.asarray(dm.tokens["train"]), np.asarray(dm.tokens["val"])
    # Ten records and one text file end with EOT; each source's training part is closed by one more.
    assert (np.concatenate([train, val]) == eot).sum() == 11 + 2
    # Each source contributes its own last 20% to validation: the jsonl's tail and the text's tail.
    decoded_val = dm.tokenizer.decode(val.tolist(), skip_special_tokens=False)
    assert "document number 9." in decoded_val and "document number 0." not in decoded_val
    assert english_text(5_000)[-200:] in decoded_val
    assert dm.meta["val_tokens"] == pytest.approx(0.2 * (dm.meta["train_tokens"] + dm.meta["val_tokens"]), abs=2)


def test_validation_is_the_tail_and_never_overlaps_training(corpus):
    dm = prepared(corpus)
    text = corpus.read_text()
    train_text = dm.tokenizer.decode(np.asarray(dm.tokens["train"]).tolist())
    val_text = dm.tokenizer.decode(np.asarray(dm.tokens["val"]).tolist())
    assert train_text + val_text == text
    assert text.startswith(train_text) and len(val_text) == pytest.approx(0.1 * len(text), rel=0.1)


def test_cache_is_reused_and_rebuilt_when_corpus_or_tokenizer_changes(corpus, tmp_path):
    dm = prepared(corpus)
    train_bin = dm.folder / "train-00000.bin"
    first = train_bin.stat().st_mtime_ns
    prepared(corpus)
    assert train_bin.stat().st_mtime_ns == first, "an unchanged corpus must reuse the cache"

    corpus.write_text(corpus.read_text() + "\nA new paragraph at the end.\n")
    dm2 = prepared(corpus)
    assert train_bin.stat().st_mtime_ns != first, "a changed corpus must rebuild the cache"
    assert dm2.meta["corpus_sha256"] != dm.meta["corpus_sha256"]

    other = tmp_path / "other-tokenizer.json"
    save_tokenizer(train_tokenizer([CHINESE], vocab_size=280), other)
    dm3 = prepared(corpus, tokenizer_path=str(other))
    assert dm3.meta["tokenizer"] != dm2.meta["tokenizer"] and dm3.tokenizer.get_vocab_size() == 280


def test_a_half_written_cache_is_never_taken_for_whole(corpus):
    dm = prepared(corpus)
    meta = json.loads((dm.folder / "meta.json").read_text())
    # A run killed while writing: the token file is shorter than its meta says.
    with open(dm.folder / "train-00000.bin", "r+b") as f:
        f.truncate(100)
    dm2 = prepared(corpus)
    assert dm2.meta["train_tokens"] == meta["train_tokens"]
    assert (dm.folder / "train-00000.bin").stat().st_size == meta["train_tokens"] * 2
    assert not list(dm.folder.glob(".*.tmp")), "no temporary files may be left behind"


def test_a_sharded_cache_reads_as_the_same_token_stream(corpus, tmp_path):
    whole = prepared(corpus, cache_dir=str(tmp_path / "whole"))
    sharded = prepared(corpus, cache_dir=str(tmp_path / "sharded"), shard_tokens=1000)
    n_train = sharded.meta["train_tokens"]
    assert len(sharded.meta["train_shards"]) == -(-n_train // 1000) > 2
    assert sorted(p.name for p in sharded.folder.glob("train-*.bin"))[:2] == ["train-00000.bin", "train-00001.bin"]
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(sharded.tokens[split]), np.asarray(whole.tokens[split]))
    # The same training batches and validation windows, windows across shard boundaries included.
    a = TrainWindows(whole.tokens["train"], block_size=16, batch_size=256, seed=3)
    b = TrainWindows(sharded.tokens["train"], block_size=16, batch_size=256, seed=3)
    assert all(torch.equal(a[(0, i)], b[(0, i)]) for i in range(4))
    va, vb = ValWindows(whole.tokens["val"], 16), ValWindows(sharded.tokens["val"], 16)
    assert len(va) == len(vb) and all(torch.equal(va[i], vb[i]) for i in range(len(va)))
    # A rebuild into fewer shards leaves none of the old ones behind.
    rebuilt = prepared(corpus, cache_dir=str(tmp_path / "sharded"), shard_tokens=3000, vocab_size=400)
    assert len(list(rebuilt.folder.glob("train-*.bin"))) == len(rebuilt.meta["train_shards"]) < len(sharded.meta["train_shards"])


def test_token_shards_pickle_as_file_names(corpus):
    dm = prepared(corpus, shard_tokens=5000)
    data = pickle.dumps(dm.tokens["train"])
    assert len(data) < len(dm.tokens["train"]) / 10, "DataLoader workers must map the files, not receive a copy of the tokens"
    again = pickle.loads(data)
    assert np.array_equal(np.asarray(again), np.asarray(dm.tokens["train"]))


def test_token_shards_gather_windows_across_boundaries():
    stream = np.arange(50, dtype=np.uint16)
    tokens = TokenShards([stream[:7], stream[7:8], stream[8:30], stream[30:]])
    starts = np.array([0, 5, 6, 7, 8, 25, 29, 40])
    assert np.array_equal(tokens.windows(starts, 10), stream[starts[:, None] + np.arange(10)])
    assert np.array_equal(tokens[3:45], stream[3:45]) and len(tokens) == 50


def test_train_windows_are_deterministic_per_key_and_rank():
    tokens = TokenShards([np.arange(1000, dtype=np.uint16)])
    ds = TrainWindows(tokens, block_size=8, batch_size=4, seed=1)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert a.shape == (4, 9) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(0, 4)]) and not torch.equal(a, ds[(1, 3)])
    assert not torch.equal(a, TrainWindows(tokens, 8, 4, seed=1, rank=1)[(0, 3)])
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 8, dtype=torch.long))  # contiguous windows


def test_sampler_resumes_mid_epoch_only():
    sampler = ResumableSampler(num_batches=5)
    sampler.resume_at(2, 3)
    assert list(sampler) == [(2, 3), (2, 4)]
    assert list(sampler) == [(2, 3), (2, 4)]  # a DataLoader with workers iterates its sampler twice per pass
    sampler.set_epoch(3)
    assert list(sampler) == [(3, i) for i in range(5)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_windows_cover_every_target_once_across_ranks(world_size):
    tokens = TokenShards([np.arange(103, dtype=np.uint16)])
    targets = []
    for rank in range(world_size):
        ds = ValWindows(tokens, block_size=10, rank=rank, world_size=world_size)
        targets += [t for i in range(len(ds)) for t in ds[i][1:].tolist()]
    assert sorted(targets) == list(range(1, 101))  # 10 windows of 10 targets, the 2-token remainder dropped


@pytest.mark.parametrize("setup, message", BAD_CORPORA.values(), ids=BAD_CORPORA.keys())
def test_bad_corpora_get_one_line_errors(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        prepared(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_must_be_inside_zero_one(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        TextDataModule(val_fraction=fraction)


def test_builtin_corpus_needs_no_files():
    dm = prepared(None, vocab_size=400, block_size=64)
    assert dm.meta["train_tokens"] > 50_000
    total = dm.meta["train_tokens"] + dm.meta["val_tokens"]
    assert dm.meta["val_tokens"] == pytest.approx(0.1 * total, rel=0.05)  # the tail of every topic
    assert " the " in dm.tokenizer.decode(np.asarray(dm.tokens["val"][:2000]).tolist())


def test_tokenizer_never_sees_the_validation_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat. " * 400 + "zyzzyva quokka " * 30)  # inside the last 10%: validation
    dm = prepared(path, vocab_size=400)
    vocab = [dm.tokenizer.decode([i]) for i in range(dm.tokenizer.get_vocab_size())]
    assert any("mat" in t for t in vocab)
    assert not any("zyzz" in t or "quok" in t for t in vocab), "validation words must not become tokens"
