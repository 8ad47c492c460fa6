"""The batching loop: every request in flight decodes in one batch, one token per row per step, in one thread.

A request that arrives mid-generation is prefilled alone and joins the batch at the next step (continuous
batching): the rows of the KV cache are at different positions (:class:`~lm_lightning.model.KVCache`'s per-row
``lengths``). A row leaves the batch as soon as it ends or its client goes away (``Request.cancelled``).
Sampling is :func:`~lm_lightning.generate.next_token` with each request's settings and seed, and the UTF-8 guard
(:class:`~lm_lightning.generate.Utf8Guard`) is applied per row, so every answer is valid UTF-8 unless the request
turns it off (``valid_utf8``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from lm_lightning.generate import BOUNDARY, Sampling, TextGenerator, TextStream, next_token
from lm_lightning.model import KVCache

log = logging.getLogger(__name__)
T = TypeVar("T")


def in_passing_thread(work: Callable[[], T]) -> T:
    """``work()`` run in a thread that ends when it returns (its exception raised here).

    For what computes before the engine starts (loading the model): libgomp, torch's OpenMP on Linux, stops
    spinning between parallel regions once it manages more threads than there are cores, and a thread's team lives
    as long as the thread. Had the main thread computed, its team would outlive the load and every operation of the
    engine's thread would then wait on a sleeping worker: 1.4-2x slower decoding on 2 cores.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="lm-lightning-load") as pool:
        return pool.submit(work).result()


@dataclass
class Event:
    """What one choice of a request produced in one step."""

    index: int
    """The choice (0 to ``n - 1``)."""
    text: str
    """New final text ('' while bytes or a possible stop string wait)."""
    finish_reason: str | None = None
    """``stop`` (end-of-text, a stop token or string), ``length`` (``max_tokens`` reached) or ``error``; ``None``: more follows."""
    tokens: int = 0
    """Tokens this choice generated so far."""


@dataclass
class Request:
    """A prompt to continue ``n`` times; ``emit`` receives each :class:`Event` (called from the engine's thread)."""

    ids: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    n: int = 1
    stop_tokens: frozenset[int] = frozenset()
    """Token ids that end a choice besides the model's own (a chat template's end-of-turn)."""
    cancelled: bool = False
    """Set when the client went away: the engine drops the request's rows at its next step."""


@dataclass
class _Row:
    request: Request
    index: int
    stream: TextStream
    generator: torch.Generator | None
    tokens: int = 0
    state: int = BOUNDARY


class Engine:
    """Runs the requests :meth:`submit` hands it, batched, in a thread of its own (:meth:`start`, :meth:`stop`)."""

    def __init__(self, generator: TextGenerator, max_batch: int = 64):
        """``max_batch``: the most rows (choices of all requests) decoded at once; more wait their turn."""
        self.generator = generator
        self.model = generator.model
        self.max_batch = max_batch
        self.device = self.model.lm_head.weight.device
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None
        self.thread = threading.Thread(target=self._run, name="lm-lightning-engine", daemon=True)
        self.stopping = False

    def submit(self, request: Request) -> None:
        self.queue.put(request)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the thread once every request in flight is done."""
        self.stopping = True
        self.queue.put(None)
        self.thread.join()

    def in_flight(self) -> int:
        return len(self.rows) + self.queue.qsize()

    def _run(self) -> None:
        waiting: list[Request] = []
        while True:
            try:
                while True:
                    item = self.queue.get(block=not self.rows and not waiting)
                    if item is not None:
                        waiting.append(item)
                    elif not self.rows and not waiting and self.queue.empty():
                        return
            except queue.Empty:
                pass
            waiting = [r for r in waiting if not r.cancelled]
            while waiting and len(self.rows) + waiting[0].n <= self.max_batch:
                self._guarded(self._admit, waiting[0])
                waiting.pop(0)
            if self.rows:
                self._guarded(self._step)
            elif self.stopping and not waiting and self.queue.empty():
                return

    def _guarded(self, work: Callable, *args) -> None:
        """Run ``work``; on an unexpected error end the rows involved with ``finish_reason='error'`` instead of the thread."""
        try:
            work(*args)
        except Exception:
            log.exception("generation failed")
            requests = {id(r): r for r in [*args, *(row.request for row in self.rows)]}
            for request in requests.values():
                for i in range(request.n):
                    request.emit(Event(i, "", "error"))
            self.rows, self.cache, self.logits = [], None, None

    @torch.inference_mode()
    def _admit(self, request: Request) -> None:
        """Prefill ``request``'s prompt once and add its ``n`` rows to the batch."""
        config, weight = self.model.config, self.model.lm_head.weight
        ids = torch.tensor(request.ids, dtype=torch.long, device=self.device)
        cache = KVCache(config, 1, min(config.block_size, len(ids) + request.sampling.max_new_tokens), weight.device, weight.dtype)
        logits = self.model.forward(ids[None], cache, last_only=True)[:, -1].expand(request.n, -1)
        cache.select(torch.zeros(request.n, dtype=torch.long, device=self.device))
        if self.cache is None:
            self.cache, self.logits = cache, logits
        else:
            self.cache.join(cache)
            self.logits = torch.cat([self.logits, logits])
        seed = request.sampling.seed
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        guard = request.sampling.valid_utf8
        for i in range(request.n):
            stream = TextStream(self.generator.table, request.sampling.stop, drop_unfinished=guard)
            self.rows.append(_Row(request, i, stream, generator))

    @torch.inference_mode()
    def _step(self) -> None:
        """Pick one token per row, emit the text, drop the rows that ended, and run the others one position on."""
        logits = self.logits[:, : len(self.generator.table)]  # the embedding may have spare rows past the vocabulary
        guarded = [row.request.sampling.valid_utf8 for row in self.rows]
        if any(guarded):
            guard = self.generator.utf8_guard
            states = torch.tensor([row.state for row in self.rows], device=self.device)
            last = torch.tensor([row.tokens + 1 == row.request.sampling.max_new_tokens for row in self.rows], device=self.device)
            logits = guard.mask(logits, states, last, None if all(guarded) else torch.tensor(guarded, device=self.device))
        # One draw per group of rows with the same settings; a seeded request draws from its own generator.
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.rows):
            sampling = row.request.sampling
            key = (sampling.temperature, sampling.top_k, sampling.top_p, id(row.generator) if row.generator else None)
            groups.setdefault(key, []).append(i)
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
        for (temperature, top_k, top_p, _), rows in groups.items():
            at = torch.tensor(rows, device=self.device)
            tokens[at] = next_token(logits[at], temperature, top_k, top_p, self.rows[rows[0]].generator)
        if any(guarded):
            for row, state, on in zip(self.rows, guard.advance(states, tokens).tolist(), guarded):
                row.state = state if on else BOUNDARY  # an unguarded row's bytes may leave UTF-8: its state is unused
        keep = []
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            row.tokens += 1
            request = row.request
            if request.cancelled:
                continue
            if token in self.generator.stop_tokens or token in request.stop_tokens:
                text, reason = row.stream.close(), "stop"
            else:
                text = row.stream.push(token)
                reason = "stop" if row.stream.done else None
                if reason is None and row.tokens >= request.sampling.max_new_tokens:
                    text, reason = text + row.stream.close(), "length"
            request.emit(Event(row.index, text, reason, row.tokens))
            if reason is None:
                keep.append(i)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                self.cache = self.logits = None
                return
            rows = torch.tensor(keep, device=self.device)
            self.cache.select(rows)
            tokens = tokens[rows]
        self.logits = self.model.forward(tokens[:, None], self.cache, last_only=True)[:, -1]
