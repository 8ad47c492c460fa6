"""Windows of tokens: random training batches that a resumed run draws exactly as an uninterrupted
run would, the loader Lightning checkpoints for that, and the validation windows that cover a split once.
A conversation corpus is read a conversation per row instead, padded (see :class:`ConversationBatches`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lm_lightning.data.cache import Conversations, TokenShards


class TrainWindows(Dataset):
    """Random ``(batch_size, block_size + 1)`` windows of the training tokens, one batch per index.

    Batch ``(epoch, i)`` is a pure function of ``(seed, rank, epoch, i)``: resuming at batch ``i``
    gives exactly the batches an uninterrupted run would have seen, whatever ``num_workers`` is.
    """

    def __init__(self, tokens: TokenShards, block_size: int, batch_size: int, seed: int, rank: int = 0):
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        rng = np.random.default_rng([self.seed, self.rank, epoch, i])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        return torch.from_numpy(self.tokens.windows(starts, self.block_size + 1).astype(np.int64))


class ResumableSampler(Sampler):
    """Yields batch keys ``(epoch, i)`` for ``i`` in ``[0, num_batches)``; Lightning sets the epoch.

    ``num_batches=None`` (step-based training): an endless stream of keys ``(0, i)``, ``i`` counting the run's
    batches, so batch ``i`` does not depend on ``max_steps`` nor on where a run stopped: training on with a
    larger ``max_steps`` draws what a longer run would have. ``max_steps`` ends training, not the data.

    After ``resume_at(epoch, start)``, passes over that epoch start at batch ``start`` (an endless stream:
    whatever the epoch); the next epoch is whole. The resume point is not used up by a first ``iter()``: a
    DataLoader with workers calls it twice per pass.
    """

    def __init__(self, num_batches: int | None, epoch: int = 0):
        self.num_batches = num_batches
        self.epoch = epoch
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, start)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless sampler has no length")  # what Lightning and DataLoader take for endless
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.num_batches is None:
            return ((0, i) for i in itertools.count(self._resume[1] if self._resume is not None else 0))
        # The epoch is read now, not per item: workers fetch keys ahead of Lightning's set_epoch.
        epoch = self.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        return ((epoch, i) for i in range(start, self.num_batches))


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints (it has ``state_dict``), so a resumed run continues mid-epoch.

    ``consumed`` reports how many batches of the current epoch (of the run, with an endless sampler) the
    training loop has finished; the
    loader itself cannot count them, as workers and Lightning's fetcher read ahead. Its state names the
    next batch to train on, so it does not depend on ``num_workers``. (torchdata's ``StatefulDataLoader``
    would add a dependency, and its state counts what its workers fetched ahead, not what was trained on.)
    """

    def __init__(self, *args, consumed: Callable[[], int] = lambda: 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed = consumed

    def state_dict(self) -> dict[str, int]:
        epoch, consumed = self.sampler.epoch, int(self._consumed())
        if self.sampler.num_batches is not None and consumed >= self.sampler.num_batches:  # saved at the end of an epoch: the next one starts from 0
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(state["epoch"], state["consumed"])


class ValWindows(Dataset):
    """Consecutive, non-overlapping windows over the validation tokens; this rank's share of them.

    Window ``k`` starts at ``k * block_size``, so every token after the first is a target exactly
    once. Rank ``r`` of ``w`` takes windows ``r, r + w, ...``: no duplicates, no gaps.
    """

    def __init__(self, tokens: TokenShards, block_size: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.block_size = block_size
        self.windows = range(rank, (len(tokens) - 1) // block_size, world_size)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.windows[i] * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))



def conversation_rows(
    tokens: TokenShards, conversations: Conversations, indices, max_length: int, pad_id: int, all_targets: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations ``indices``, one per row, cut to ``max_length`` tokens and padded after their end with ``pad_id``
    to the longest row: ``(ids, targets)``, ``targets`` true where a token is trained on (the assistant's; every
    token of the conversation with ``all_targets``), false on padding. A row starts at position 0, as a conversation
    does when the model is talked to, and no row attends to another's tokens."""
    starts, ends = conversations.starts[indices], conversations.starts[np.asarray(indices) + 1]
    lengths = np.minimum(ends - starts, max_length)
    ids = np.full((len(starts), int(lengths.max())), pad_id, dtype=np.int64)
    targets = np.zeros(ids.shape, dtype=bool)
    for row, (start, length) in enumerate(zip(starts, lengths)):
        ids[row, :length] = tokens[int(start) : int(start + length)]
        targets[row, :length] = True if all_targets else conversations.mask[int(start) : int(start + length)]
    return torch.from_numpy(ids), torch.from_numpy(targets)


class ConversationBatches(Dataset):
    """Random batches of ``batch_size`` conversations, each cut to ``block_size + 1`` tokens, padded to the
    batch's longest (padding, not packing: rows start at position 0 and never attend to another conversation).
    Batch ``(epoch, i)`` is a pure function of ``(seed, rank, epoch, i)``, as :class:`TrainWindows`'."""

    def __init__(
        self, tokens: TokenShards, conversations: Conversations, block_size: int, batch_size: int, seed: int,
        pad_id: int, rank: int = 0, all_targets: bool = False,
    ):
        self.tokens, self.conversations = tokens, conversations
        self.block_size, self.batch_size, self.seed, self.rank = block_size, batch_size, seed, rank
        self.pad_id, self.all_targets = pad_id, all_targets

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = key
        rng = np.random.default_rng([self.seed, self.rank, epoch, i])
        indices = rng.integers(0, len(self.conversations), size=self.batch_size)
        return conversation_rows(
            self.tokens, self.conversations, indices, self.block_size + 1, self.pad_id, self.all_targets
        )


class ConversationRows(Dataset):
    """Every conversation of a split once, a row each (this rank's share: ``rank, rank + world_size, ...``), cut to
    ``block_size + 1`` tokens; :meth:`collate` pads a batch of them. Scored on the assistant's tokens only."""

    def __init__(
        self, tokens: TokenShards, conversations: Conversations, block_size: int, pad_id: int,
        rank: int = 0, world_size: int = 1,
    ):
        self.tokens, self.conversations, self.block_size, self.pad_id = tokens, conversations, block_size, pad_id
        self.indices = range(rank, len(conversations), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return self.indices[i]

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return conversation_rows(self.tokens, self.conversations, indices, self.block_size + 1, self.pad_id)
