"""The valid-UTF-8 guard: its decoder states against Python's UTF-8 decoder, over every byte and every token of a
real byte-level tokenizer; and generated text from a random model (which picks invalid bytes often) that is
broken without the guard and valid with it, in every sampling mode, in samples, streams and the CLI."""

import codecs
import functools
import itertools

import pytest
import torch

from lm_lightning.export import export_pretrained
from lm_lightning.generate import BOUNDARY, DEAD, Sampling, TextGenerator, Utf8Guard, generate_tokens, next_token
from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import EOT, token_bytes, train_tokenizer

from conftest import run_main

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "我爱北京天安门"
MODES = {
    "greedy": dict(temperature=0),
    "sampling": dict(temperature=1.0),
    "top_k": dict(temperature=1.0, top_k=40),
    "top_p": dict(temperature=1.2, top_p=0.9),
}


@pytest.fixture(scope="module")
def zh_tokenizer():
    with open("/work/shared/data/zh_poetry.txt", encoding="utf-8") as f:
        text = f.read(60_000)
    return train_tokenizer([text], vocab_size=800)


@pytest.fixture(scope="module")
def poem_starts() -> list[str]:
    """The first 7 characters of lines of the poems."""
    with open("/work/shared/data/zh_poetry.txt", encoding="utf-8") as f:
        lines = [line.strip() for line in itertools.islice(f, 2000) if len(line.strip()) >= 7]
    return [line[:7] for line in lines[::50]]


@pytest.fixture(scope="module")
def random_generator(zh_tokenizer) -> TextGenerator:
    """A random model over a byte-level vocabulary learnt from Chinese poems: many of its tokens are parts of
    characters, and a model that has learnt nothing picks them in orders that are not UTF-8."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=zh_tokenizer.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=32)
    return TextGenerator(GPT(config).eval(), zh_tokenizer)


@functools.cache
def unfinished_characters() -> frozenset[bytes]:
    """Every proper prefix of the UTF-8 encoding of every character, as Python's encoder writes them."""
    return frozenset(
        chr(c).encode()[:n] for c in itertools.chain(range(0x80, 0xD800), range(0xE000, 0x110000)) for n in range(1, len(chr(c).encode()))
    )


def valid_prefix(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 so far (a character may be unfinished at its end): Python's decoder for the
    whole characters, Python's encoder for the unfinished one (the decoder waits on some bytes it could refuse, ED A0)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return False
    waiting = decoder.getstate()[0]
    return not waiting or waiting in unfinished_characters()


def complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def walk(guard: Utf8Guard, tokens: list[int]) -> int | None:
    """The decoder state after ``tokens`` from a character boundary, or None once a token is not allowed."""
    after, blocked = guard.after.tolist(), guard.blocked.tolist()
    return walk_lists(after, blocked, tokens)


def walk_lists(after: list[list[int]], blocked: list[list[bool]], tokens: list[int]) -> int | None:
    state = BOUNDARY
    for token in tokens:
        if blocked[state][token]:
            return None
        state = after[state][token]
    return state


def test_states_agree_with_pythons_decoder_on_every_byte_sequence():
    # Single-byte tokens: every sequence of 1 or 2 bytes; of 3 (and of 4 after a 4-byte lead) over the bytes where
    # the rules change.
    guard = Utf8Guard([bytes([b]) for b in range(256)])
    after, blocked = guard.after.tolist(), guard.blocked.tolist()  # plain lists: fast to index one at a time
    edges = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED,
             0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    sequences = [list(s) for s in itertools.product(range(256), repeat=2)]
    sequences += [list(s) for s in itertools.product(edges, repeat=3)]
    sequences += [[lead, *s] for lead in (0xF0, 0xF1, 0xF3, 0xF4, 0xF5) for s in itertools.product(edges, repeat=3)]
    for seq in sequences:
        state, data = walk_lists(after, blocked, seq), bytes(seq)
        assert (state is not None) == valid_prefix(data), data.hex()
        assert (state == BOUNDARY) == complete(data), data.hex()


def test_every_token_of_a_real_vocabulary_is_allowed_exactly_where_it_continues_utf8(zh_tokenizer):
    table = token_bytes(zh_tokenizer)
    guard = Utf8Guard(table)
    eot = zh_tokenizer.token_to_id(EOT)
    # Text that ends in each decoder state: whole, and inside 2-, 3- and 4-byte characters (E0, ED, F0, F4 too).
    prefixes = [b"a", "é".encode()[:1], "我".encode()[:1], "我".encode()[:2], b"\xe0", b"\xed", "😀".encode()[:1],
                "😀".encode()[:2], "😀".encode()[:3], b"\xf4", b"\xf4\x8f"]
    byte_guard = Utf8Guard([bytes([b]) for b in range(256)])
    for prefix in prefixes:
        state = torch.tensor([walk(byte_guard, list(prefix))])
        allowed = torch.isfinite(guard.mask(torch.zeros(1, len(table)), state))[0]
        assert (guard.advance(state, allowed.nonzero()[:, 0].expand(1, -1)) != DEAD).all()
        for token, data in enumerate(table):
            expected = valid_prefix(prefix + data) if data else complete(prefix)
            assert bool(allowed[token]) == expected, (prefix, data, token == eot)
        assert bool(allowed[eot]) == (prefix == b"a")  # end-of-text only between characters


def test_the_last_token_ends_a_character_where_one_can(random_generator):
    empty = 0
    for seed in range(30):
        for n in (1, 2, 3):
            texts = random_generator.generate(PROMPT, max_new_tokens=n, num_samples=4, seed=seed, temperature=1.0)
            assert all("\ufffd" not in text for text in texts), texts
            empty += sum(not text for text in texts)
    assert empty < 20  # of 360: only a token of no bytes (a special token, a random model draws some) gives no text


@pytest.mark.parametrize("mode", MODES)
def test_random_model_breaks_characters_without_the_guard_and_never_with_it(random_generator, poem_starts, mode):
    broken = {False: 0, True: 0}
    for seed, prompt in enumerate([PROMPT, *poem_starts[:9]]):  # greedy needs other prompts to give other text
        for valid_utf8 in (False, True):
            texts = random_generator.generate(prompt, max_new_tokens=50, num_samples=5, seed=seed, valid_utf8=valid_utf8,
                                              **MODES[mode])
            broken[valid_utf8] += sum("\ufffd" in t for t in texts)
            assert len(texts) == 5
    assert broken[True] == 0
    assert broken[False] > 0  # the test can fail: without the guard this model does break characters


@pytest.mark.parametrize("mode", ["sampling", "top_p"])
def test_streamed_pieces_are_whole_characters(random_generator, mode):
    for seed in range(6):
        steps = list(random_generator.stream(PROMPT, num_samples=3, max_new_tokens=40, seed=seed, **MODES[mode]))
        assert all("\ufffd" not in piece for pieces in steps for piece in pieces)
        texts = ["".join(p) for p in zip(*steps)]
        assert texts == random_generator.generate(PROMPT, num_samples=3, max_new_tokens=40, seed=seed, **MODES[mode])


@pytest.mark.parametrize("mode", MODES)
def test_without_the_guard_output_is_the_unguarded_sampler_token_for_token(random_generator, mode):
    """``valid_utf8=False`` is exactly the sampler without a guard: what transformers' generate is compared with."""
    settings = Sampling(max_new_tokens=30, seed=5, valid_utf8=False, **MODES[mode])
    ids = random_generator.encode_prompt(PROMPT)
    generator = torch.Generator().manual_seed(5)
    vocab = len(random_generator.table)

    def pick(logits):
        return next_token(logits[:, :vocab], settings.temperature, settings.top_k, settings.top_p, generator)

    tokens = torch.stack(list(generate_tokens(random_generator.model, ids, 30, 2, pick)), dim=1).tolist()
    expected = []
    for row in tokens:
        row = row[: row.index(random_generator.eot_id)] if random_generator.eot_id in row else row
        expected.append(b"".join(random_generator.table[t] for t in row).decode("utf-8", errors="replace"))
    assert random_generator.complete(PROMPT, settings, num_samples=2) == expected


def test_end_of_text_waits_for_a_character_boundary(random_generator):
    """A model that always prefers end-of-text: unguarded, it stops at once; guarded, still at once from a boundary."""
    eot = random_generator.eot_id
    guard = random_generator.utf8_guard
    logits = torch.zeros(3, len(random_generator.table))
    logits[:, eot] = 100.0
    lead = random_generator.table.index(next(b for b in random_generator.table if len(b) == 1 and b[0] >= 0xE0))
    states = guard.advance(torch.full((3,), BOUNDARY), torch.tensor([0, lead, lead]))
    picked = next_token(guard.mask(logits, states), temperature=0)
    assert picked[0] == eot and (picked[1:] != eot).all()


def test_a_batch_masks_each_row_as_alone(random_generator):
    """A server's batch: per-row last steps and per-row guards give each row the mask it gets alone (unguarded: none)."""
    guard = random_generator.utf8_guard
    lead = random_generator.table.index(next(b for b in random_generator.table if len(b) == 1 and b[0] >= 0xE0))
    states = guard.advance(torch.full((4,), BOUNDARY), torch.tensor([0, lead, lead, lead]))
    logits = torch.randn(4, len(random_generator.table))
    last, rows = torch.tensor([False, False, True, True]), torch.tensor([True, True, True, False])
    want = [guard.mask(logits[i : i + 1], states[i : i + 1], last=bool(last[i])) if rows[i] else logits[i : i + 1] for i in range(4)]
    assert torch.equal(guard.mask(logits, states, last, rows), torch.cat(want))


def test_cli_generate_valid_utf8_flag(random_generator, tmp_path, capsys):
    folder = export_pretrained(random_generator.model, random_generator.tokenizer, tmp_path / "model")
    outputs = {}
    for flag in ("true", "false"):
        args = ["generate", "--ckpt_path", str(folder), "--prompt", PROMPT, "--max_new_tokens", "50", "--num_samples", "5",
                "--seed", "1", "--temperature", "1.0", "--device", "cpu", "--valid_utf8", flag]
        assert run_main(*args) == 0
        outputs[flag] = capsys.readouterr().out
    assert "\ufffd" not in outputs["true"] and outputs["true"].count(PROMPT) == 5
    assert "\ufffd" in outputs["false"]
    assert run_main("generate", "--ckpt_path", str(folder), "--prompt", PROMPT, "--max_new_tokens", "30", "--stream",
                    "--seed", "2", "--temperature", "1.0", "--device", "cpu") == 0
    assert "\ufffd" not in capsys.readouterr().out


def test_a_lead_byte_the_vocabulary_cannot_finish_is_never_allowed():
    # ED needs a byte 80-9F next; this vocabulary has only A0 (which E6 may take): ED would be a dead end.
    table = [bytes([b]) for b in range(0x80)] + [b"\xed", b"\xa0", b"\xe6"]
    guard = Utf8Guard(table)
    assert guard.blocked[BOUNDARY, 0x80] and not guard.blocked[BOUNDARY, 0x82]
    assert walk(guard, [0x82, 0x81, 0x81]) == BOUNDARY  # E6 A0 A0 is U+6800
