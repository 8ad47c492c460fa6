"""Sentencepiece-style tokenizers with byte fallback (Llama 2, Mistral, TinyLlama, Gemma): ``<0xNN>`` tokens are one
byte, ``▁`` is a space. Built as those tokenizer.json files are (a BPE with ``byte_fallback``, ``▁`` for spaces, a
ByteFallback + Fuse + Strip decoder), checked against the tokenizers library's decoder, transformers' tokenizer and a
random transformers Llama folder that generates (valid UTF-8) and is evaluated (exact bytes)."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lm_lightning.data.cache import iter_document_ids
from lm_lightning.data.corpus import resolve_sources
from lm_lightning.evaluate import evaluate_model
from lm_lightning.generate import TextGenerator
from lm_lightning.pretrained import load_source
from lm_lightning.tokenizer import begin_of_text, continuation_tokenizer, is_byte_fallback, token_bytes, train_tokenizer

from conftest import CHINESE, UNICODE_SAMPLES, english_text, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = UNICODE_SAMPLES + [" a leading space, and  two"]
SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_fallback_tokenizer(style: str) -> Tokenizer:
    """A sentencepiece-style BPE laid out as Llama 2's tokenizer.json is: ``<unk>``, ``<s>``, ``</s>``, then the 256
    ``<0xNN>`` byte tokens, then the learnt pieces (few characters: most Chinese falls back to bytes).

    ``style``: ``llama2`` (a normalizer that prepends ``▁`` and writes spaces as ``▁``; BOS added; a decoder that
    strips the prepended space), ``metaspace`` (the newer form: a Metaspace pre-tokenizer, prepend_scheme first) or
    ``gemma`` (spaces as ``▁``, nothing prepended, no BOS)."""
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, limit_alphabet=100, show_progress=False)
    trainer_tokenizer.train_from_iterator([english_text(30_000), CHINESE * 5], trainer=trainer)
    spec = json.loads(trainer_tokenizer.to_str())
    vocab = {token: i for i, token in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get):
        vocab.setdefault(token, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama2":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.pre_tokenizer = None
    elif style == "metaspace":
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.pre_tokenizer = None
    if style == "gemma":
        tokenizer.decoder = decoders.Sequence(steps)
        tokenizer.post_processor = None
    else:
        tokenizer.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tokenizer


STYLES = ["llama2", "metaspace", "gemma"]


@pytest.fixture(scope="module", params=STYLES)
def styled(request) -> tuple[str, Tokenizer]:
    return request.param, byte_fallback_tokenizer(request.param)


def test_byte_tokens_are_one_byte_and_the_space_mark_a_space(styled):
    _, tokenizer = styled
    table = token_bytes(tokenizer)
    assert is_byte_fallback(tokenizer)
    assert [table[3 + b] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert [table[i] for i in range(3)] == [b"", b"", b""]  # <unk>, <s>, </s>: special, no text
    assert table[tokenizer.token_to_id("▁the")] == b" the"


def prepended(style: str, text: str) -> str:
    """The text as the tokenizer spells it: Llama 2's normalizer puts a space before every text, the Metaspace
    pre-tokenizer (prepend_scheme first) before one that does not start with a space, Gemma's before none."""
    if style == "llama2" or (style == "metaspace" and not text.startswith(" ")):
        return " " + text
    return text


@pytest.mark.parametrize("text", SAMPLES)
def test_token_bytes_spell_the_text_the_decoder_and_transformers_decode(styled, text):
    from transformers import PreTrainedTokenizerFast

    style, tokenizer = styled
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids) or text.isascii()
    # The tokens spell the text with the space the tokenizer puts before it, which its decoder strips again.
    spelt = b"".join(token_bytes(tokenizer)[i] for i in ids).decode("utf-8")
    assert spelt == prepended(style, text)
    # The decoders of Llama 2 and the Metaspace form strip one space at the start of what they decode (which loses
    # a text's own leading space in the Metaspace form: the tokens still spell it).
    decoded = spelt.removeprefix(" ") if style != "gemma" else spelt
    assert tokenizer.decode(ids) == decoded == (text if style != "metaspace" else text.removeprefix(" "))
    assert PreTrainedTokenizerFast(tokenizer_object=tokenizer).decode(ids) == decoded


def test_a_document_encoded_in_pieces_gets_one_leading_space(styled):
    """Training encodes a file line by line: the lines after the first go through ``continuation_tokenizer``, so
    the document's tokens spell its bytes with one prepended space, as when it is encoded whole."""
    style, tokenizer = styled
    text = "我爱北京天安门\n  two spaces\nHello, world!\n" * 3
    lines = text.splitlines(keepends=True)
    continuation = continuation_tokenizer(tokenizer)
    ids = tokenizer.encode(lines[0], add_special_tokens=False).ids
    for line in lines[1:]:
        ids += continuation.encode(line, add_special_tokens=False).ids
    assert b"".join(token_bytes(tokenizer)[i] for i in ids) == prepended(style, text).encode("utf-8")
    assert (continuation is tokenizer) == (style == "gemma")
    byte_level = train_tokenizer([text], 300)
    assert continuation_tokenizer(byte_level) is byte_level


def test_training_reads_a_file_as_the_tokenizer_encodes_it_whole(styled, tmp_path):
    """The token cache's rule (``iter_document_ids``, line by line): the tokens of the document encoded whole, so
    ``val/bpb`` counts its bytes and one prepended space (none for Gemma)."""
    style, tokenizer = styled
    text = "我爱北京天安门\nHello, world!\n\n  indented\n" * 50
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    pieces = list(iter_document_ids(resolve_sources(str(tmp_path / "doc.txt"))[0], "text", tokenizer, np.int64, lambda t: None))
    ids = np.concatenate(pieces).tolist()
    assert ids[0] == (1 if style != "gemma" else ids[0]) and ids[-1] == 2  # <s> (added by the post-processor), </s>
    body = [i for i in ids if i not in (1, 2)]
    assert b"".join(token_bytes(tokenizer)[i] for i in body) == prepended(style, text).encode("utf-8")
    assert body == tokenizer.encode(text, add_special_tokens=False).ids


def transformers_llama_folder(tmp_path, tokenizer: Tokenizer, add_bos_token: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    folder = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": add_bos_token, "add_eos_token": False,
         "tokenizer_class": "LlamaTokenizer"}))
    return folder


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_a_llama_folder_with_byte_fallback_loads_with_transformers_bos(tmp_path, add_bos_token):
    """BOS as transformers 5 puts it: its fast tokenizers follow tokenizer.json's post-processor (``add_bos_token`` in
    tokenizer_config.json, which transformers 4 also read, no longer changes it)."""
    from transformers import AutoTokenizer

    folder = transformers_llama_folder(tmp_path, byte_fallback_tokenizer("llama2"), add_bos_token)
    model, tokenizer, info = load_source(folder)
    theirs = AutoTokenizer.from_pretrained(folder)
    # But for a text that starts with a space: transformers 5's LlamaTokenizer rebuilds the pipeline with a Metaspace
    # pre-tokenizer (no "▁" before a text that has a space) where tokenizer.json, as sentencepiece, always puts one.
    for text in [t for t in SAMPLES if not t.startswith(" ")]:
        assert tokenizer.encode(text).ids == theirs(text).input_ids
    assert begin_of_text(tokenizer) == 1 and info.stop_tokens == (2,)


def test_byte_fallback_generation_is_valid_utf8_and_streams_whole_characters(tmp_path):
    folder = transformers_llama_folder(tmp_path, byte_fallback_tokenizer("llama2"), True)
    generator = TextGenerator.load(folder)
    broken = {False: 0, True: 0}
    for seed in range(8):
        for valid_utf8 in (False, True):
            texts = generator.generate("我爱北京", max_new_tokens=40, num_samples=4, seed=seed, temperature=1.0, valid_utf8=valid_utf8)
            broken[valid_utf8] += sum("\ufffd" in t for t in texts)
    assert broken[True] == 0 and broken[False] > 0
    steps = list(generator.stream("我爱北京", max_new_tokens=40, seed=1, temperature=1.0))
    assert all("\ufffd" not in p for pieces in steps for p in pieces)
    # A continuation starts with the space its first "▁piece" stands for (the decoder strips it only at a text's start).
    assert any(text.startswith(" ") for text in generator.generate("Hello", max_new_tokens=5, num_samples=8, seed=2, temperature=1.0))


def test_evaluate_counts_the_bytes_of_the_text(tmp_path, capsys):
    folder = transformers_llama_folder(tmp_path, byte_fallback_tokenizer("llama2"), True)
    text = "我爱北京天安门\nHello there, world.\n" * 5
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    model, tokenizer, _ = load_source(folder)
    scores = evaluate_model(model, tokenizer, str(tmp_path / "text.txt"))
    assert scores.bytes == len(text.encode("utf-8"))
    assert run_main("evaluate", "--ckpt_path", str(folder), "--data.path", str(tmp_path / "text.txt"), "--json", "--mlflow", "false",
                    "--device", "cpu") == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == len(text.encode("utf-8"))
