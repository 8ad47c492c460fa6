"""A token cache whose contents lie: rebuilt (or refused with one line), never trained on, never a traceback."""

import json

import numpy as np
import pytest

from conftest import CHINESE
from lm_lightning.data import TextDataModule
from lm_lightning.data.corpus import DataError
from lm_lightning.tokenizer import train_tokenizer


@pytest.fixture
def built(corpus):
    dm = TextDataModule(str(corpus), vocab_size=300, block_size=16, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    return dm, {p.name: p.read_bytes() for p in dm.folder.glob("*.bin")}, dm.tokenizer.to_str()


def rebuilt_as_before(dm, shards, tokenizer_json) -> None:
    dm.prepare_data()
    dm.setup("fit")
    assert {p.name: p.read_bytes() for p in dm.folder.glob("*.bin")} == shards
    assert dm.tokenizer.to_str() == tokenizer_json


def edit_meta(dm, **changes) -> None:
    meta = json.loads((dm.folder / "meta.json").read_text())
    (dm.folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_a_shard_overwritten_with_ff_bytes_of_the_same_size_is_rebuilt(built):
    dm, shards, tokenizer_json = built
    shard = dm.folder / "train-00000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    rebuilt_as_before(dm, shards, tokenizer_json)


def test_a_test_shard_overwritten_with_ff_bytes_is_rebuilt(corpus):
    dm = TextDataModule(str(corpus), vocab_size=300, block_size=16, batch_size=4, test_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    shards, tokenizer_json = {p.name: p.read_bytes() for p in dm.folder.glob("*.bin")}, dm.tokenizer.to_str()
    shard = dm.folder / "test-00000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    rebuilt_as_before(dm, shards, tokenizer_json)


def test_a_swapped_tokenizer_in_meta_is_rebuilt(built):
    dm, shards, tokenizer_json = built
    edit_meta(dm, tokenizer_json=train_tokenizer([CHINESE * 20], 300).to_str())
    rebuilt_as_before(dm, shards, tokenizer_json)


def test_a_swapped_tokenizer_is_refused_when_only_opened(built):
    dm, _, _ = built
    edit_meta(dm, tokenizer_json=train_tokenizer([CHINESE * 20], 300).to_str())
    with pytest.raises(DataError, match="holds another tokenizer than its meta.json names; delete the folder to rebuild it"):
        dm.setup("fit")


def test_has_text_false_for_a_real_corpus_is_rebuilt(built):
    dm, shards, tokenizer_json = built
    edit_meta(dm, has_text=False)
    rebuilt_as_before(dm, shards, tokenizer_json)
    assert dm.meta["has_text"] is True and np.asarray(dm.tokens["train"]).max() < 300
