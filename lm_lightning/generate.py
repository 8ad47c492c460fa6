"""Text generation: sampling through the KV cache, batched over samples, with a streaming decode
that never splits a character or prints part of a stop string, and a guard that keeps every sample
valid UTF-8 (:class:`Utf8Guard`).

    from lm_lightning.generate import TextGenerator
    TextGenerator.load("runs/.../best.ckpt").generate("我爱北京天安门", max_new_tokens=50, num_samples=5)
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lm_lightning.errors import UserError
from lm_lightning.model import GPT, KVCache
from lm_lightning.pretrained import load_source
from lm_lightning.tokenizer import end_of_text, token_bytes


MAX_NEW_TOKENS_LIMIT = 32_768
"""The most tokens one sample may ask for (``max_new_tokens``)."""
MAX_NUM_SAMPLES = 1_024
"""The most samples of one prompt generated in one batch (``num_samples``)."""
MAX_REQUEST_PROMPTS = 256
"""The most prompts one request to a served model may hold."""
MAX_REQUEST_NEW_TOKENS = 65_536
"""The most tokens one request to a served model may ask for, all prompts and samples together
(prompts x samples x ``max_new_tokens``): a bound on the time one request takes."""


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
    valid_utf8: bool = True
    """Give no probability to a token whose bytes cannot continue valid UTF-8 (nor to end-of-text inside a
    character), so every sample is valid UTF-8. False: sample from the model's distribution as it is (token
    for token what tools without the guard, such as transformers' ``generate``, give)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens} is more than the limit of {MAX_NEW_TOKENS_LIMIT} tokens per sample")
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
    if temperature == 0:
        return logits.argmax(dim=-1)
    # A row whose scaled logits overflow (a temperature of 1e-38: its largest to +inf, or all of them to -inf, so that
    # softmax is NaN) is greedy: the limit is the same. Chosen per row after sampling, with no test in Python: no
    # boolean indexing, no device sync.
    greedy, scaled = logits.argmax(dim=-1), logits.float() / temperature
    return torch.where(torch.isfinite(scaled.amax(dim=-1)), _sample(scaled, top_k, top_p, generator), greedy)


def _sample(logits: torch.Tensor, top_k: int | None, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones already reach top_p; the most likely always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # One uniform per row against the cumulative distribution (float64: the sums keep every token's share). Exact
    # categorical sampling, and one random number per row where torch.multinomial draws one per token (12x faster at
    # 16 x 1000 logits); u stays below the total, so a token of probability 0 is never drawn.
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=logits.device, generator=generator) * total
    return torch.searchsorted(cdf, torch.minimum(u, total.nextafter(torch.zeros_like(total))), right=True).squeeze(-1)


def check_num_samples(num_samples: int) -> None:
    """Refuse a ``num_samples`` outside 1 to :data:`MAX_NUM_SAMPLES`."""
    if num_samples < 1:
        raise SamplingError(f"num_samples={num_samples} must be at least 1")
    if num_samples > MAX_NUM_SAMPLES:
        raise SamplingError(f"num_samples={num_samples} is more than the limit of {MAX_NUM_SAMPLES} samples at once; run several times")


# The states of a UTF-8 decoder between bytes (the well-formed byte sequences of the Unicode standard, its
# table 3-7): at a character boundary; expecting 1, 2 or 3 more continuation bytes (80-BF); or expecting 2 or
# 3 more after a lead byte whose next byte has a narrower range (E0: A0-BF, no overlong forms; ED: 80-9F, no
# surrogates; F0: 90-BF, no overlong forms; F4: 80-8F, nothing past U+10FFFF). DEAD: no longer UTF-8.
BOUNDARY, NEED_1, NEED_2, NEED_3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4, DEAD = range(9)
N_STATES = DEAD


def _utf8_transitions() -> np.ndarray:
    """``(9, 256)``: the state after each byte value, in each state."""
    table = np.full((N_STATES + 1, 256), DEAD, dtype=np.int64)
    leads = {BOUNDARY: range(0x80), NEED_1: range(0xC2, 0xE0), AFTER_E0: [0xE0], NEED_2: [*range(0xE1, 0xED), 0xEE, 0xEF],
             AFTER_ED: [0xED], AFTER_F0: [0xF0], NEED_3: range(0xF1, 0xF4), AFTER_F4: [0xF4]}
    for state, lead_bytes in leads.items():
        table[BOUNDARY, list(lead_bytes)] = state
    continuations = {NEED_1: (0x80, 0xBF, BOUNDARY), NEED_2: (0x80, 0xBF, NEED_1), NEED_3: (0x80, 0xBF, NEED_2),
                     AFTER_E0: (0xA0, 0xBF, NEED_1), AFTER_ED: (0x80, 0x9F, NEED_1),
                     AFTER_F0: (0x90, 0xBF, NEED_2), AFTER_F4: (0x80, 0x8F, NEED_2)}
    for state, (low, high, after) in continuations.items():
        table[state, low : high + 1] = after
    return table


class Utf8Guard:
    """Which tokens may come next so that the text stays valid UTF-8, for a whole vocabulary at once.

    Built once per tokenizer from its byte table: each token is run through a UTF-8 decoder from each of the
    decoder's states (vectorised over the vocabulary, one pass per byte position), giving the state after the
    token, or none where its bytes cannot follow. A token may leave a character unfinished (a Chinese
    character split across byte-level tokens): it moves the state. A token of no bytes (end-of-text and the
    other special tokens) and a stop token come only at a character boundary. A sampler then masks the logits
    of each row with the row of its sample's state: one gather and one ``masked_fill`` per step.
    """

    def __init__(self, table: Sequence[bytes], boundary_only: Sequence[int] = ()):
        """``table``: the bytes of each token id (:func:`~lm_lightning.tokenizer.token_bytes`); ``boundary_only``:
        ids allowed only between characters besides the tokens of no bytes (e.g. end-of-sequence tokens)."""
        self.vocab_size = len(table)
        lengths = np.fromiter((len(b) for b in table), dtype=np.int64, count=len(table))
        flat = np.frombuffer(b"".join(table), dtype=np.uint8).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        transitions = _utf8_transitions()
        after = np.tile(np.arange(N_STATES)[:, None], (1, len(table)))
        for j in range(int(lengths.max(initial=0))):
            live = np.flatnonzero(lengths > j)  # the tokens that have a byte at position j
            after[:, live] = transitions[after[:, live], flat[starts[live] + j]]
        blocked = after == DEAD
        boundary_only = np.flatnonzero(lengths == 0).tolist() + [i for i in boundary_only if 0 <= i < len(table)]
        blocked[BOUNDARY + 1 :, boundary_only] = True
        # A vocabulary without the bytes to finish some character (a byte-fallback one missing <0xNN> tokens): block
        # the tokens that lead into a state with no way on, until none is left, so sampling never meets a dead end.
        for _ in range(N_STATES):
            dead_end = np.append(blocked.all(axis=1), True)
            newly = ~blocked & dead_end[after]
            if not newly.any():
                break
            blocked |= newly
        # On the last step, a token that ends between characters where one is allowed: the sample ends whole.
        unfinished = blocked | (after != BOUNDARY)
        last_blocked = np.where(unfinished.all(axis=1, keepdims=True), blocked, unfinished)
        self.after = torch.from_numpy(after)
        """``(8, V)``: the decoder state after each token, from each state (``DEAD`` where its bytes cannot follow)."""
        self.blocked = torch.from_numpy(blocked)
        """``(8, V)``: the tokens each state does not allow."""
        self.last_blocked = torch.from_numpy(last_blocked)
        """``(8, V)``: the same on a sample's last step, which also blocks tokens that leave a character unfinished."""
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``after`` and ``[blocked, last_blocked]`` stacked ``(2, 8, V)``, on ``device``, copied there once."""
        if device not in self._on:
            self._on[device] = (self.after.to(device), torch.stack([self.blocked, self.last_blocked]).to(device))
        return self._on[device]

    def mask(
        self, logits: torch.Tensor, states: torch.Tensor, last: bool | torch.Tensor = False, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logits`` ``(B, V)`` with ``-inf`` for the tokens each row's state ``states`` ``(B,)`` does not allow
        (on the ``last`` step, also for those that would leave a character unfinished, where another is allowed).
        Per row (a server's batch): ``last`` ``(B,)`` says which rows are on their last step, and only ``rows``
        ``(B,)`` (bool) are guarded."""
        _, blocks = self._tables(logits.device)
        block = blocks[torch.as_tensor(last, device=states.device).long(), states]  # one gather, whichever table each row needs
        if rows is not None:
            block &= rows[:, None]
        return logits.masked_fill(block, float("-inf"))

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder state of each row after its token."""
        after, _ = self._tables(states.device)
        return after[states, tokens]


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


def _free_bytes(device: torch.device) -> int | None:
    """Memory free for tensors on ``device`` (a GPU's free memory; ``MemAvailable`` of ``/proc/meminfo`` for the
    CPU), or ``None`` where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TextStream:
    """The text of one sample, released as it becomes final.

    Byte-level tokens often end inside a UTF-8 character (a Chinese character is three bytes, split
    across tokens), so bytes wait in an incremental decoder until they complete a character. Text
    that may be the start of a stop string waits until it is known not to be one; a stop string
    ends the text, without the stop string itself.
    """

    def __init__(self, table: Sequence[bytes], stop: Sequence[str] = (), drop_unfinished: bool = False):
        """``drop_unfinished``: at :meth:`close`, drop the bytes of a character left unfinished (a sample that
        ran out of tokens inside one) instead of showing them as U+FFFD."""
        self.table = table
        self.drop_unfinished = drop_unfinished
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
        """End the text: release what waits (bytes of an unfinished character become U+FFFD, or are dropped)."""
        if self.done:
            return ""
        if self.drop_unfinished:
            self.decoder.reset()
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
        self._utf8_guard: Utf8Guard | None = None

    @property
    def utf8_guard(self) -> Utf8Guard:
        """The tokenizer's :class:`Utf8Guard`, built on first use (samples with ``valid_utf8=False`` never need it)."""
        if self._utf8_guard is None:
            self._utf8_guard = Utf8Guard(self.table, sorted(self.stop_tokens))
        return self._utf8_guard

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
        return self.sample_ids(self.encode_prompt(prompt), sampling, num_samples)

    def sample_ids(self, ids: torch.Tensor, sampling: Sampling, num_samples: int = 1) -> Iterator[list[str]]:
        """:meth:`sample` from prompt token ids already encoded (a chat template's rendering, at most ``block_size``)."""
        check_num_samples(num_samples)
        self._check_memory(len(ids) + sampling.max_new_tokens, num_samples)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(ids.device).manual_seed(sampling.seed)
        n_text_tokens = len(self.table)  # the embedding may have spare rows past the tokenizer's vocabulary
        guard = self.utf8_guard if sampling.valid_utf8 else None
        states = torch.full((num_samples,), BOUNDARY, dtype=torch.long, device=ids.device)  # a prompt is whole text
        steps = 0

        def pick(logits: torch.Tensor) -> torch.Tensor:
            nonlocal states, steps
            logits = logits[:, :n_text_tokens]
            steps += 1
            if guard is not None:
                logits = guard.mask(logits, states, last=steps == sampling.max_new_tokens)
            token = next_token(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
            if guard is not None:
                states = guard.advance(states, token)
            return token

        streams = [TextStream(self.table, sampling.stop, drop_unfinished=guard is not None) for _ in range(num_samples)]
        for tokens in generate_tokens(self.model, ids, sampling.max_new_tokens, num_samples, pick):
            pieces = []
            for s, token in zip(streams, tokens.tolist()):
                pieces.append(s.close() if token in self.stop_tokens else s.push(token))
            yield pieces
            if all(s.done for s in streams):
                return
        yield [s.close() for s in streams]

    def _check_memory(self, length: int, num_samples: int) -> None:
        """Refuse, before allocating it, a KV cache for ``num_samples`` samples of ``length`` tokens that the
        device has no free memory for."""
        config, weight = self.model.config, self.model.lm_head.weight
        cache = 2 * config.n_layer * num_samples * config.kv_heads * min(length, config.block_size) * config.head_size
        needed = cache * weight.element_size() + num_samples * (length * 8 + 4 * 4 * len(self.table))  # + ids, logits
        free = _free_bytes(weight.device)
        if free is not None and needed > free:
            raise SamplingError(
                f"num_samples={num_samples} of {length} tokens need {needed / 2**30:.1f} GiB for the KV cache, more than "
                f"the {free / 2**30:.1f} GiB free on {weight.device}; generate fewer samples at once or fewer max_new_tokens"
            )

    def stream(self, prompt: str = "", num_samples: int = 1, **sampling) -> Iterator[list[str]]:
        """:meth:`sample` with the ``Sampling`` settings as keywords (``max_new_tokens``, ``temperature``, ...)."""
        return self.sample(prompt, Sampling(**sampling), num_samples)

    def complete(self, prompt: str, sampling: Sampling, num_samples: int = 1) -> list[str]:
        """The continuations of ``prompt`` (without the prompt), one per sample."""
        return ["".join(p) for p in zip(*self.sample(prompt, sampling, num_samples))]

    def generate(self, prompt: str = "", num_samples: int = 1, **sampling) -> list[str]:
        """:meth:`complete` with the ``Sampling`` settings as keywords (``max_new_tokens``, ``temperature``, ...)."""
        return self.complete(prompt, Sampling(**sampling), num_samples)
