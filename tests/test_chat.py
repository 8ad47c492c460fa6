"""Chat templates rendered and tokenized as transformers' apply_chat_template does, on real templates."""

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lm_lightning.chat_template import (
    DEFAULT_TEMPLATE,
    ChatError,
    ChatTemplate,
    check_messages,
    load_chat_template,
    record_messages,
)
from lm_lightning.tokenizer import load_tokenizer, train_tokenizer

QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# Multi-line, so trim_blocks/lstrip_blocks matter; tojson and loop controls (break) as Hub templates use them.
BLOCKS = """{% for message in messages %}
    {% if loop.index > 8 %}{% break %}{% endif %}
    <|im_start|>{{ message.role }} {{ {"n": loop.index, "c": "<&>"} | tojson }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

SPECIALS = {
    "qwen": (QWEN, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "blocks": (BLOCKS, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|endoftext|>"),
    "default": (DEFAULT_TEMPLATE, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|endoftext|>"),
}
CHAT = [
    {"role": "user", "content": "What is 2 + 3? 你好"},
    {"role": "assistant", "content": "5, 世界"},
    {"role": "user", "content": " and 4 + 4 ?"},
    {"role": "assistant", "content": "8"},
]
TEXTS = ["hello world, what is two plus three? five. 你好世界 " * 20, "the answer is 12345 and 678.\n" * 20]


def chat_folder(tmp_path, name):
    source, specials, bos, eos = SPECIALS[name]
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    tokenizer.add_special_tokens(specials)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "chat_template": source}
    if bos:
        config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_ids_equal_apply_chat_template(tmp_path, name):
    folder = chat_folder(tmp_path, name)
    hf = AutoTokenizer.from_pretrained(folder)
    template, tokenizer = load_chat_template(folder), load_tokenizer(folder / "tokenizer.json")
    for messages, prompt in ((CHAT, False), (CHAT[:3], True), (CHAT[:1], True)):
        assert template.render(messages, prompt) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert template.encode(tokenizer, messages, prompt) == list(expected)


def test_list_form_and_jinja_file(tmp_path):
    folder = chat_folder(tmp_path, "qwen")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": QWEN}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(folder).source == QWEN
    (folder / "chat_template.jinja").write_text(GEMMA)
    assert load_chat_template(folder).source == GEMMA


def test_mask_marks_assistant_content_and_end_of_turn(tmp_path):
    folder = chat_folder(tmp_path, "default")
    template, tokenizer = load_chat_template(folder), load_tokenizer(folder / "tokenizer.json")
    ids, mask = template.encode_with_mask(tokenizer, CHAT)
    assert ids == template.encode(tokenizer, CHAT)
    target = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert target == "5, 世界<|im_end|>\n8<|im_end|>\n"
    assert template.stop_token_ids(tokenizer)[0] == tokenizer.token_to_id("<|im_end|>")


def test_stop_tokens_per_family(tmp_path):
    for name, turn in (("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>")):
        folder = chat_folder(tmp_path, name)
        template, tokenizer = load_chat_template(folder), load_tokenizer(folder / "tokenizer.json")
        stops = template.stop_token_ids(tokenizer)
        assert stops[0] == tokenizer.token_to_id(turn)
        assert tokenizer.token_to_id(SPECIALS[name][3]) in stops


def test_bad_input_is_one_line(tmp_path):
    cases = [
        ("not a list", "non-empty list"),
        ([{"role": "user"}], "string role and content"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
    ]
    for messages, words in cases:
        with pytest.raises(ChatError, match=words) as e:
            check_messages(messages, "line 3")
        assert "\n" not in str(e.value) and "line 3" in str(e.value)
    assert record_messages({"prompt": "q", "completion": "a"})[1] == {"role": "assistant", "content": "a"}
    assert record_messages({"text": "plain"}) is None
    with pytest.raises(ChatError, match="failed to render.*System role"):
        ChatTemplate(GEMMA, bos_token="<bos>").render([{"role": "system", "content": "x"}])
    with pytest.raises(ChatError, match="does not parse"):
        ChatTemplate("{% for %}").render(CHAT)
    folder = tmp_path / "none"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ChatError, match="has no chat template"):
        load_chat_template(folder)
    assert load_chat_template(folder, required=False) is None


def test_export_carries_the_default_template(tmp_path):
    import torch

    from lm_lightning.chat_template import CHAT_SPECIAL_TOKENS
    from lm_lightning.export import export_pretrained
    from lm_lightning.model import GPT, GPTConfig

    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    tokenizer.add_special_tokens(list(CHAT_SPECIAL_TOKENS))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    folder = export_pretrained(model, tokenizer, tmp_path / "export", chat_template=DEFAULT_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(folder)
    expected = hf.apply_chat_template(CHAT[:3], tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    template = load_chat_template(folder)
    assert template.source == DEFAULT_TEMPLATE
    assert template.encode(tokenizer, CHAT[:3], add_generation_prompt=True) == list(expected)


def qwen_chat_folder(tmp_path):
    """A tiny random transformers Qwen3 folder with the Qwen-style chat template."""
    import torch
    import transformers

    folder = chat_folder(tmp_path, "qwen")
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(folder)
    return folder, tokenizer, hf


CHAT_CLI = [sys.executable, "-m", "lm_lightning.cli", "chat", "--temperature", "0", "--max_new_tokens", "24", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_greedy_chat_cli_equals_transformers(tmp_path):
    import torch

    folder, tokenizer, hf = qwen_chat_folder(tmp_path)
    question = "What is 2 + 3? 你好"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    stops = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    new = [t for t in out[0, len(ids):].tolist()]
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert len(new) > 3  # a real answer to compare, not an immediate end of turn
    result = subprocess.run(
        [*CHAT_CLI, "--ckpt_path", str(folder), "--system", "Be brief.", "--prompt", question, "--valid_utf8", "false"],
        capture_output=True, text=True, env=ENV, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    piped = subprocess.run(
        [*CHAT_CLI, "--ckpt_path", str(folder), "--system", "Be brief.", "--valid_utf8", "false"],
        input=question, capture_output=True, text=True, env=ENV, timeout=120,
    )
    assert piped.stdout == result.stdout


def test_terminal_chat_is_multi_turn_with_reset(tmp_path):
    folder, _, _ = qwen_chat_folder(tmp_path)

    def one_turn(text):
        return subprocess.run([*CHAT_CLI, "--ckpt_path", str(folder), "--prompt", text], capture_output=True, text=True, env=ENV).stdout

    primary, secondary = pty.openpty()  # standard input a terminal: the multi-turn loop
    os.write(primary, "2 + 3?\n/reset\n你好\n/exit\n".encode())
    run = subprocess.run([*CHAT_CLI, "--ckpt_path", str(folder)], stdin=secondary, capture_output=True, text=True, env=ENV, timeout=120)
    os.close(primary), os.close(secondary)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "> " + one_turn("2 + 3?") + "> > " + one_turn("你好") + "> "  # /reset answers nothing
