"""Generation on a really trained tiny model: KV cache against full recomputation, sampling, stop
strings, the end-of-text token, streaming that never splits a Chinese character."""

import pytest
import torch

from lm_lightning.generate import TextGenerator, TextStream, generate_tokens, next_token
from lm_lightning.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator(tiny_run) -> TextGenerator:
    return TextGenerator.load(tiny_run["checkpoint"])


def greedy_without_cache(model: GPT, prompt: torch.Tensor, num_samples: int, max_new_tokens: int) -> torch.Tensor:
    """The reference: a full forward over the whole sequence for every new token."""
    idx = prompt[None].repeat(num_samples, 1)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, len(prompt) :]


@pytest.mark.parametrize("prompt", ["", "The ", "床前明月光，疑是地上霜。", "class Foo:\n    def"])
def test_greedy_with_kv_cache_matches_full_recomputation(generator, prompt):
    ids = generator.encode_prompt(prompt)
    new = generator.model.config.block_size - len(ids)  # as far as the window goes
    cached = torch.stack(list(generate_tokens(generator.model, ids, new, 3, lambda logits: logits.argmax(-1))), dim=1)
    torch.testing.assert_close(cached, greedy_without_cache(generator.model, ids, 3, new), rtol=0, atol=0)


def test_generation_runs_past_block_size(generator):
    ids = generator.encode_prompt("The ")
    block_size = generator.model.config.block_size
    tokens = list(generate_tokens(generator.model, ids, 3 * block_size, 2, lambda logits: logits.argmax(-1)))
    assert len(tokens) == 3 * block_size
    within = torch.stack(tokens[: block_size - len(ids)], dim=1)
    torch.testing.assert_close(within, greedy_without_cache(generator.model, ids, 2, block_size - len(ids)), rtol=0, atol=0)
    ids = torch.stack(tokens, dim=1)[0].tolist()
    ids = ids[: ids.index(generator.eot_id)] if generator.eot_id in ids else ids
    assert generator.generate("The ", max_new_tokens=3 * block_size, temperature=0) == [generator.tokenizer.decode(ids)]


def test_long_prompt_is_cropped_from_the_left_with_a_warning(generator):
    prompt = "Hello world. " * 40
    with pytest.warns(UserWarning, match=r"only its last 32 \(block_size\)"):
        ids = generator.encode_prompt(prompt)
    assert ids.tolist() == generator.tokenizer.encode(prompt).ids[-32:]


def test_same_seed_same_text_and_samples_differ(generator):
    kwargs = dict(max_new_tokens=24, num_samples=4, temperature=1.0, seed=11)
    first = generator.generate("The ", **kwargs)
    assert first == generator.generate("The ", **kwargs)
    assert len(set(first)) > 1
    assert first != generator.generate("The ", **{**kwargs, "seed": 12})


def test_samples_follow_the_distribution_and_never_a_token_of_probability_zero():
    """Each row's draw is categorical with the softmax's probabilities: frequencies over 100k rows within 1%, and the
    tokens masked to -inf (the UTF-8 guard's) never come, whatever their place, first or last."""
    probs = torch.tensor([0.0, 0.1, 0.6, 0.0, 0.3, 0.0])
    logits = probs.log().expand(100_000, -1)
    tokens = next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(tokens, minlength=6) / len(tokens), probs, atol=0.01)
    assert not torch.isin(tokens, torch.tensor([0, 3, 5])).any()


def test_top_k_1_and_tiny_top_p_are_greedy(generator):
    greedy = generator.generate("The ", max_new_tokens=16, temperature=0)
    assert generator.generate("The ", max_new_tokens=16, temperature=1.5, top_k=1, seed=0) == greedy
    assert generator.generate("The ", max_new_tokens=16, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_stream_yields_the_text_of_generate(generator):
    kwargs = dict(max_new_tokens=20, num_samples=2, seed=3)
    steps = list(generator.stream("床前", **kwargs))
    assert all(len(pieces) == 2 for pieces in steps)
    assert ["".join(p) for p in zip(*steps)] == generator.generate("床前", **kwargs)


def test_stream_never_splits_a_chinese_character(generator):
    text = "我爱北京天安门，低头思故乡。"
    ids = generator.tokenizer.encode(text).ids
    assert len(ids) > len(text)  # some characters are split across byte-level tokens
    stream = TextStream(generator.table)
    pieces = [stream.push(i) for i in ids] + [stream.close()]
    assert "".join(pieces) == text
    assert "" in pieces[:-1]  # bytes were held back ...
    assert all("\ufffd" not in p for p in pieces)  # ... never printed as half a character


def test_stop_string_ends_the_text_and_is_never_printed_in_part(generator):
    text = "print('hello world') and more"
    stream = TextStream(generator.table, stop=["world", "zzz"])
    pieces = [stream.push(i) for i in generator.tokenizer.encode(text).ids]
    assert "".join(pieces) == "print('hello "
    assert stream.done and stream.push(5) == "" and stream.close() == ""
    partial = TextStream(generator.table, stop=["wor"])  # a stop string's start that is not followed by the rest
    out = [partial.push(i) for i in generator.tokenizer.encode("say wow now").ids] + [partial.close()]
    assert "".join(out) == "say wow now"


def test_stop_strings_in_generation(generator):
    kwargs = dict(max_new_tokens=30, temperature=1.0, seed=5)
    full = generator.generate("The ", **kwargs)[0]
    stop = full[12:15]
    cut = generator.generate("The ", stop=["never there", stop], **kwargs)[0]
    assert cut == full[: full.index(stop)] and len(cut) <= 12


def test_generation_stops_at_end_of_text(tiny_run):
    generator = TextGenerator.load(tiny_run["checkpoint"])  # a copy to tamper with
    transformer = generator.model.transformer
    with torch.no_grad():
        # The final LayerNorm now outputs its bias alone, which the tied head scores highest
        # against the end-of-text embedding: end-of-text is the most likely next token everywhere.
        direction = torch.randn(transformer.ln_f.bias.shape)
        transformer.ln_f.weight.zero_()
        transformer.ln_f.bias.copy_(direction)
        transformer.wte.weight[generator.eot_id] = 100 * direction
    steps = list(generator.stream("The ", max_new_tokens=50, num_samples=2, temperature=0))
    assert steps == [["", ""]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
        (dict(num_samples=0), "num_samples=0 must be at least 1"),
        (dict(top_k=0), "top_k=0 must be at least 1"),
    ],
)
def test_bad_sampling_settings_are_refused(generator, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generator.generate("The ", **kwargs)
