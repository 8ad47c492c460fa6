"""Text generation: sampling through the KV cache, batched over samples, with a streaming decode
that never splits a character or prints part of a stop string.

    from lm_lightning.generate import TextGenerator
    TextGenerator.load("runs/.../best.ckpt").generate("我爱北京天安门", max_new_tokens=50, num_samples=5)
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lm_lightning.errors import UserError
from lm_lightning.model import GPT, KVCache
from lm_lightning.pretrained import load_source
from lm_lightning.tokenizer import end_of_text, token_bytes


class SamplingError(UserError):
    """Sampling settings no sampler can honour."""


@dataclass
class Sampling:
    """How text is sampled: one settings type for ``lm-lightning generate``, the samples logged during
    training and the served MLflow model."""

    max_new_tokens: int = 100
    """Tokens to generate per sample (fewer if it stops earlier)."""
    temperature: float = 0.8
    """Softmax temperature; 0 is greedy decoding, below 1 is more conservative, above 1 more random."""
    top_k: int | None = None
    """Sample only from the ``top_k`` most likely tokens. Unset: from all."""
    top_p: float = 1.0
    """Nucleus sampling: only from the most likely tokens whose probabilities add up to ``top_p``, in (0, 1]."""
    seed: int | None = None
    """Seed of the sampler; the same seed gives the same text. Unset: different text each time."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample (not included), e.g. ``'["\\n\\n"]'``. Samples also end at end-of-text."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature} must be >= 0 (0 is greedy decoding)")
        if self.top_k is not None and self.top_k < 1:
            raise SamplingError(f"top_k={self.top_k} must be at least 1 (unset it to sample from every token)")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")
        self.stop = list(self.stop or ())


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` ``(B, V)``: the most likely at temperature 0, else a sample
    from the ``top_k`` most likely tokens and the smallest set of them whose probability reaches ``top_p``."""
    scaled = logits.float() / temperature if temperature else logits
    # Greedy at 0, and at a temperature so small that the scaled logits overflow (1e-38): the limit is the same.
    if temperature == 0 or not torch.isfinite(scaled[torch.isfinite(logits)]).all():
        return logits.argmax(dim=-1)
    logits = scaled
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones already reach top_p; the most likely always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: GPT, prompt: torch.Tensor, max_new_tokens: int, num_samples: int, pick: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Yield the next token of each of ``num_samples`` samples, ``(num_samples,)``, ``max_new_tokens`` times.

    ``prompt`` (1-D, 1 to ``block_size`` ids) is prefilled once and shared by the samples; each step
    then feeds one token per sample through the KV cache. ``pick`` maps last-position logits
    ``(B, V)`` to token ids ``(B,)``. When the cache is full, the last 3/4 of the window is
    prefilled again at positions from 0 (what a model that reads the last tokens sees), so
    generation runs past ``block_size`` at the cost of one prefill every ``block_size / 4`` steps.
    """
    # model.forward, not model(): a model compiled in place for training (LanguageModel's compile)
    # would recompile for every new cache length.
    forward = model.forward
    block_size = model.config.block_size
    weight = model.lm_head.weight
    n = len(prompt)
    cache = KVCache(model.config, 1, min(block_size, n + max_new_tokens), weight.device, weight.dtype)
    logits = forward(prompt[None], cache, last_only=True)[:, -1].expand(num_samples, -1)
    cache.expand(num_samples)
    tokens = torch.empty(num_samples, n + max_new_tokens, dtype=torch.long, device=weight.device)
    tokens[:, :n] = prompt
    keep = max(1, block_size * 3 // 4)
    for step in range(max_new_tokens):
        token = pick(logits)
        tokens[:, n] = token
        n += 1
        yield token
        if step == max_new_tokens - 1:
            break
        if cache.length == cache.max_len:
            cache.length = 0
            logits = forward(tokens[:, n - keep : n], cache, last_only=True)[:, -1]
        else:
            logits = forward(token[:, None], cache, last_only=True)[:, -1]


class TextStream:
    """The text of one sample, released as it becomes final.

    Byte-level tokens often end inside a UTF-8 character (a Chinese character is three bytes, split
    across tokens), so bytes wait in an incremental decoder until they complete a character. Text
    that may be the start of a stop string waits until it is known not to be one; a stop string
    ends the text, without the stop string itself.
    """

    def __init__(self, table: Sequence[bytes], stop: Sequence[str] = ()):
        self.table = table
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.done = False

    def push(self, token: int) -> str:
        """Add one token; return the text that became final ('' while bytes or a possible stop string wait)."""
        if self.done:
            return ""
        self.pending += self.decoder.decode(self.table[token])
        return self._release()

    def close(self) -> str:
        """End the text: release what waits (bytes of an unfinished character become U+FFFD)."""
        if self.done:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        self.done = True
        return self._release()

    def _release(self) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.pending, self.done = self.pending[: min(hits)], "", True
            return text
        held = 0 if self.done else self._stop_prefix_length()
        text, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held :]
        return text

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the pending text that begins a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:k]):
                    longest = k
                    break
        return longest


class TextGenerator:
    """A model and its tokenizer, ready to continue text."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, stop_tokens: Sequence[int] = ()):
        """``model`` should be in eval mode (``load`` returns one that is). A sample ends at the tokenizer's
        end-of-text token and at any of ``stop_tokens`` (a transformers folder's end-of-sequence tokens)."""
        self.model = model
        self.tokenizer = tokenizer
        self.eot_id = end_of_text(tokenizer)
        self.stop_tokens = {self.eot_id, *stop_tokens}
        self.table = token_bytes(tokenizer)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TextGenerator:
        """From a training checkpoint (``.ckpt``), a folder written by ``lm-lightning export``, or a transformers
        GPT-2, Llama or Qwen3 folder (see :func:`lm_lightning.pretrained.load_source`)."""
        model, tokenizer, info = load_source(path)
        return cls(model.to(device), tokenizer, info.stop_tokens)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Token ids of ``prompt``: end-of-text alone for an empty prompt (a new document), the
        last ``block_size`` tokens (with a warning) for a long one."""
        ids = self.tokenizer.encode(prompt).ids or [self.eot_id]
        block_size = self.model.config.block_size
        if len(ids) > block_size:
            warnings.warn(f"the prompt has {len(ids)} tokens; only its last {block_size} (block_size) are read", stacklevel=3)
            ids = ids[-block_size:]
        return torch.tensor(ids, dtype=torch.long, device=self.model.lm_head.weight.device)

    def sample(self, prompt: str, sampling: Sampling, num_samples: int = 1) -> Iterator[list[str]]:
        """Continue ``prompt``, yielding for each step the new text of every sample (a list of
        ``num_samples`` strings, '' where nothing became final). A sample ends at end-of-text, at a
        stop string, or after ``max_new_tokens`` tokens; the last list yielded completes them all.
        The same seed gives the same text; unset, sampling draws from torch's global generator."""
        if num_samples < 1:
            raise SamplingError(f"num_samples={num_samples} must be at least 1")
        ids = self.encode_prompt(prompt)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(ids.device).manual_seed(sampling.seed)
        n_text_tokens = len(self.table)  # the embedding may have spare rows past the tokenizer's vocabulary

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return next_token(logits[:, :n_text_tokens], sampling.temperature, sampling.top_k, sampling.top_p, generator)

        streams = [TextStream(self.table, sampling.stop) for _ in range(num_samples)]
        for tokens in generate_tokens(self.model, ids, sampling.max_new_tokens, num_samples, pick):
            pieces = []
            for s, token in zip(streams, tokens.tolist()):
                pieces.append(s.close() if token in self.stop_tokens else s.push(token))
            yield pieces
            if all(s.done for s in streams):
                return
        yield [s.close() for s in streams]

    def stream(self, prompt: str = "", num_samples: int = 1, **sampling) -> Iterator[list[str]]:
        """:meth:`sample` with the ``Sampling`` settings as keywords (``max_new_tokens``, ``temperature``, ...)."""
        return self.sample(prompt, Sampling(**sampling), num_samples)

    def complete(self, prompt: str, sampling: Sampling, num_samples: int = 1) -> list[str]:
        """The continuations of ``prompt`` (without the prompt), one per sample."""
        return ["".join(p) for p in zip(*self.sample(prompt, sampling, num_samples))]

    def generate(self, prompt: str = "", num_samples: int = 1, **sampling) -> list[str]:
        """:meth:`complete` with the ``Sampling`` settings as keywords (``max_new_tokens``, ``temperature``, ...)."""
        return self.complete(prompt, Sampling(**sampling), num_samples)
