"""Chat templates: a model's Jinja template rendered exactly as transformers' ``apply_chat_template`` does.

The environment matches ``transformers.utils.chat_template_utils._cached_compile_jinja_template``: an
``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks`` and the ``loopcontrols`` extension,
``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``, and the template sees ``messages``,
``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...). :meth:`ChatTemplate.encode`
tokenizes the rendered text with ``add_special_tokens=False``, as ``apply_chat_template(tokenize=True)`` does, so
the ids are the same.

:data:`DEFAULT_TEMPLATE` is ChatML for models of ours trained from scratch: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
per message, and ``<|im_start|>assistant\\n`` as the generation prompt; ``<|im_start|>`` and ``<|im_end|>``
(:data:`CHAT_SPECIAL_TOKENS`) are special tokens of the tokenizer, and ``<|im_end|>`` ends an assistant turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lm_lightning.checkpoint import TOKENIZER_KEY, load_checkpoint
from lm_lightning.errors import UserError
from lm_lightning.files import read_source_text
from lm_lightning.tokenizer import END_OF_TEXT, IM_END, IM_START, tokenizer_from_str

CHAT_TEMPLATE_KEY = "chat_template"
"""The checkpoint key (a string) and ``tokenizer_config.json`` field that hold a model's chat template."""

ROLES = ("system", "user", "assistant")

CHAT_SPECIAL_TOKENS = (IM_START, IM_END)
"""The role markers of :data:`DEFAULT_TEMPLATE`, special tokens of a tokenizer that chats with it."""

END_OF_TURN = (IM_END, "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")
"""End-of-turn tokens of the templates we know (ChatML/Qwen, Llama 3, Gemma, Phi): generation stops on them."""

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatError(UserError):
    """A conversation, or a chat template, that cannot be used."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # transformers overrides Jinja's tojson, which escapes HTML characters; templates rely on the plain form.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix or replace it") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template (Jinja text) and the special tokens it reads."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    """Other ``*_token`` variables the template may read (``unk_token``, ``pad_token``)."""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model reads it; with ``add_generation_prompt``, ending where the assistant's
        answer begins."""
        variables = {**self.special_tokens, "bos_token": self.bos_token, "eos_token": self.eos_token}
        variables = {k: v for k, v in variables.items() if v is not None}
        try:
            return _compile(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"the chat template failed to render this conversation ({e})") from None

    def encode(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of :meth:`render`, tokenized with ``add_special_tokens=False`` (as ``apply_chat_template``)."""
        return tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character spans of its assistant turns (the training targets).

        An assistant turn's span is what rendering the conversation up to and including it adds to rendering the
        conversation before it with the generation prompt: its content and what ends it (``<|im_end|>``), so the
        model learns to stop."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise ChatError(
                    "the chat template renders a conversation's beginning differently from the whole "
                    f"(turn {i + 1}); it cannot mark the assistant's tokens, use a template that renders turn by turn"
                )
            spans.append((len(before), len(upto)))
        return text, spans

    def encode_with_mask(self, tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and, per token, whether it is the assistant's (a training target):
        a token is when it starts inside an assistant span of :meth:`render_with_spans`."""
        text, spans = self.render_with_spans(messages)
        encoding = tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, span_mask(encoding.offsets, spans)

    def stop_token_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """The ids generation stops on: the end-of-turn tokens the tokenizer has, then the end-of-text (eos) token."""
        names = [t for t in END_OF_TURN if t in self.source] + [self.eos_token] + list(END_OF_TURN)
        ids = [tokenizer.token_to_id(t) for t in [*names, *END_OF_TEXT] if t]
        return tuple(dict.fromkeys(i for i in ids if i is not None))


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its character ``offsets``), whether it starts inside one of ``spans``."""
    return [any(a <= start < b for a, b in spans) for start, _ in offsets]


def check_messages(messages: Any, where: str = "the record", need_assistant: bool = True) -> list[dict]:
    """``messages`` as a list of ``{role, content}`` dicts, or a one-line :class:`ChatError` naming what is wrong
    in ``where``; ``need_assistant`` (training data) asks for at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ChatError(f"{where}: message {i + 1} must be an object with a string role and content")
        if message["role"] not in ROLES:
            raise ChatError(f"{where}: message {i + 1} has unknown role {message['role']!r}; use one of {', '.join(ROLES)}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one")
    return messages


def record_messages(record: Mapping[str, Any], where: str = "the record") -> list[dict] | None:
    """The conversation a ``.jsonl`` record holds (``messages``, or ``prompt`` and ``completion``), checked;
    ``None`` for a plain-text record."""
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ChatError(f"{where}: prompt and completion must both be strings")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return None


def _token_content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def _folder_template(folder: Path) -> ChatTemplate | None:
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(read_source_text(config_path)) if config_path.is_file() else {}
    except ValueError as e:
        raise ChatError(f"{config_path} is not valid JSON ({e})") from None
    source = config.get(CHAT_TEMPLATE_KEY)
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if (folder / "chat_template.jinja").is_file():  # transformers prefers the file to the config's field
        source = read_source_text(folder / "chat_template.jinja")
    if not isinstance(source, str):
        return None
    tokens = {k: _token_content(v) for k, v in config.items() if k.endswith("_token")}
    tokens = {k: v for k, v in tokens.items() if v is not None}
    return ChatTemplate(
        source,
        bos_token=tokens.pop("bos_token", None),
        eos_token=tokens.pop("eos_token", None),
        special_tokens=tokens,
    )


def checkpoint_template(checkpoint: Mapping[str, Any], tokenizer: Tokenizer | None = None) -> ChatTemplate | None:
    """The chat template a loaded checkpoint holds (key :data:`CHAT_TEMPLATE_KEY`), or ``None``."""
    source = checkpoint.get(CHAT_TEMPLATE_KEY)
    if not isinstance(source, str):
        return None
    eos = next((t for t in END_OF_TEXT if tokenizer is not None and tokenizer.token_to_id(t) is not None), None)
    return ChatTemplate(source, eos_token=eos)


def source_template(tokenizer_path: str | None) -> ChatTemplate | None:
    """The chat template of ``data.tokenizer_path`` when it is a model (a transformers folder, an export or a ``.ckpt``)
    that has one; ``None`` for a bare ``tokenizer.json``, no path, or a model without one."""
    path = Path(tokenizer_path) if tokenizer_path else None
    if path is None or not (path.is_dir() or path.suffix == ".ckpt"):
        return None
    return load_chat_template(path, required=False)


def training_template(tokenizer_path: str | None, tokenizer: Tokenizer) -> ChatTemplate:
    """The template conversations are rendered with for training on ``tokenizer``: :func:`source_template`, else
    :data:`DEFAULT_TEMPLATE`, whose role markers must then be special tokens of the tokenizer (every tokenizer we
    train has them)."""
    if (template := source_template(tokenizer_path)) is not None:
        return template
    missing = [t for t in CHAT_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ChatError(
            f"the tokenizer {tokenizer_path} has no {' or '.join(missing)} token and no chat template, so conversations "
            "cannot be rendered; use a model folder with a chat template, or leave data.tokenizer_path unset to train one"
        )
    eos = next((t for t in END_OF_TEXT if tokenizer.token_to_id(t) is not None), None)
    return ChatTemplate(DEFAULT_TEMPLATE, eos_token=eos)


def load_chat_template(source: str | Path, required: bool = True, checkpoint: Mapping[str, Any] | None = None) -> ChatTemplate | None:
    """The chat template of a model: a transformers folder or an export (``chat_template.jinja``, or
    ``tokenizer_config.json``'s ``chat_template``, a string or a list of named ones), or a ``.ckpt`` of ours
    (``checkpoint``: that file already loaded, not read again). With ``required``, a source without one is a
    one-line :class:`ChatError`; else ``None``."""
    path = Path(source)
    if path.is_dir():
        template = _folder_template(path)
    elif checkpoint is not None or path.is_file():
        checkpoint = load_checkpoint(path, mmap=True) if checkpoint is None else checkpoint
        tokenizer = tokenizer_from_str(checkpoint[TOKENIZER_KEY]) if TOKENIZER_KEY in checkpoint else None
        template = checkpoint_template(checkpoint, tokenizer)
    else:
        raise ChatError(f"{source} does not exist; pass a checkpoint or a transformers folder")
    if template is None and required:
        raise ChatError(
            f"{source} has no chat template (tokenizer_config.json chat_template, chat_template.jinja or the "
            "checkpoint's chat_template); use a chat model, or fine-tune one on conversations"
        )
    return template

