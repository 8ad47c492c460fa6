import pytest

from lm_lightning.tokenizer import (
    EOT,
    MIN_VOCAB_SIZE,
    TokenizerError,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    train_tokenizer,
)

from conftest import CHINESE, UNICODE_SAMPLES, english_text

SAMPLES = UNICODE_SAMPLES + [""]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([english_text(30_000), CHINESE * 20], vocab_size=600)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert b"".join(token_bytes(tokenizer)[i] for i in ids) == text.encode("utf-8")


def test_bytes_only_vocabulary_round_trips():
    tokenizer = train_tokenizer([CHINESE], vocab_size=MIN_VOCAB_SIZE)
    assert tokenizer.get_vocab_size() == MIN_VOCAB_SIZE
    for text in SAMPLES:
        ids = tokenizer.encode(text).ids
        assert len(ids) == len(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text


def test_vocab_size_below_bytes_is_rejected():
    with pytest.raises(ValueError, match="at least 259"):
        train_tokenizer(["abc"], vocab_size=100)


def test_end_of_text_is_one_special_token_with_no_bytes(tokenizer):
    eot = tokenizer.token_to_id(EOT)
    assert tokenizer.encode(f"a{EOT}b").ids.count(eot) == 1
    assert token_bytes(tokenizer)[eot] == b""


def test_chinese_learns_multi_character_tokens_but_no_line_long_ones():
    tokenizer = train_tokenizer([CHINESE] * 20, vocab_size=1000)
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(CHINESE).ids]
    han = [p for p in pieces if p and all("\u4e00" <= c <= "\u9fff" for c in p)]
    assert any(len(p) >= 2 for p in han), "BPE should merge frequent character pairs"
    assert max(len(p) for p in han) <= 4, "a line without spaces must not become one token"
    assert len(pieces) < len(CHINESE)  # fewer tokens than characters on text it was trained on


def test_save_and_load(tmp_path, tokenizer):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    assert load_tokenizer(path).encode(CHINESE).ids == tokenizer.encode(CHINESE).ids
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
