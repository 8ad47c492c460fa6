"""``TextDataModule``: text in, token batches out. It builds the token cache once per node
(``prepare_data``), maps it in every process (``setup``) and serves windows of it, or, for a corpus of
conversations, padded rows of conversations with the tokens to train on marked."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from lm_lightning.chat_template import source_template
from lm_lightning.data.cache import Conversations, TokenCache, TokenShards
from lm_lightning.data.corpus import DataError
from lm_lightning.data.windows import (
    ConversationBatches,
    ConversationRows,
    ResumableLoader,
    ResumableSampler,
    TrainWindows,
    ValWindows,
)
from lm_lightning.files import cache_root
from lm_lightning.tokenizer import end_of_text, token_byte_lengths

NO_TEST_SPLIT = (
    "there is no test split: data.test_fraction is 0; set it (e.g. --data.test_fraction 0.05) when training and "
    "testing, so the test text is held out from training"
)


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        val_batch_size: int | None = None,
        jsonl_field: str = "text",
        tokenizer_sample_bytes: int = 100_000_000,
        shard_tokens: int = 100_000_000,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        assistant_only_loss: bool = True,
    ):
        """Text in, token batches out.

        Args:
            path: A UTF-8 text file, a folder (searched recursively for .txt, .md and .jsonl files) or a
                glob. Unset: the built-in corpus, Python's reference documentation from ``pydoc_data``.
            tokenizer_path: A ``tokenizer.json`` to use, a transformers model folder (its tokenizer), or a ``.ckpt``
                of ours (the tokenizer it holds); set to ``model.init_from`` when that is set. Unset: train a
                byte-level BPE on the corpus.
            vocab_size: Size of the tokenizer to train (ignored with ``tokenizer_path``); 259 is bytes only (and the three special tokens).
            block_size: Tokens of context per training window (linked to ``model.block_size``).
            batch_size: Windows per training batch.
            val_fraction: The last fraction of each source's tokens, held out for validation.
            test_fraction: The fraction of each source's tokens before the validation part, held out for
                ``lm-lightning test``. 0: no test split. Set it for ``fit`` as well, so the test text is never trained on.
            val_batch_size: Windows per validation batch. Unset: ``batch_size``.
            jsonl_field: The field of each .jsonl record that holds its text. A record with ``messages`` (a list of
                ``{role, content}``, roles system, user, assistant) or with ``prompt`` and ``completion`` is a
                conversation instead: rendered with the chat template of ``tokenizer_path`` (a model folder's or a
                checkpoint's), else the default ChatML one. A corpus is all conversations or all text.
            tokenizer_sample_bytes: Bytes of the corpus the tokenizer is trained on (shared equally between
                files, from their training parts only); the whole corpus is tokenized with it.
            shard_tokens: Tokens per file of the token cache (200 MB at the default and a vocabulary of
                up to 65536): a larger corpus is cached in several files, which copy, sync and upload
                one at a time.
            cache_dir: Where tokenizers and token caches are kept. Unset: ``$LM_LIGHTNING_CACHE``, else
                ``~/.cache/lm_lightning``.
            num_workers: DataLoader worker processes (0 reads in the training process).
            seed: Seed of the random training windows.
            assistant_only_loss: For conversations: train on the assistant's tokens only (the rest is context);
                false trains on every token of them. Validation scores the assistant's tokens either way.
        """
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
        if not 0.0 <= test_fraction < 1.0 - val_fraction:
            raise DataError(f"data.test_fraction={test_fraction} must be >= 0 and leave text for training, e.g. 0.05")
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("shard_tokens", shard_tokens)):
            if value < 1:
                raise DataError(f"data.{name}={value} must be a positive integer")
        self.save_hyperparameters()
        self.cache = TokenCache(
            path=path,
            cache_dir=Path(os.path.expanduser(cache_dir)) if cache_dir else cache_root(),
            tokenizer_path=tokenizer_path,
            vocab_size=vocab_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            jsonl_field=jsonl_field,
            tokenizer_sample_bytes=tokenizer_sample_bytes,
            shard_tokens=shard_tokens,
        )
        self.tokenizer = None
        self.meta: dict = {}
        self.tokens: dict[str, TokenShards] = {}
        self.conversations: dict[str, Conversations] = {}

    @property
    def path(self) -> str | None:
        return self.hparams.path

    @property
    def folder(self) -> Path:
        """The token cache folder of this corpus."""
        return self.cache.folder

    def prepare_data(self) -> None:
        """Train or load the tokenizer and build the token cache, unless a valid one exists (once per node)."""
        self.cache.check_long_enough(self.cache.build(), self.hparams.block_size)

    def setup(self, stage: str | None = None) -> None:
        self.meta, self.tokenizer, self.tokens, self.conversations = self.cache.open()
        self.cache.check_long_enough(self.meta, self.hparams.block_size)
        for split, conversations in self.conversations.items():
            lengths = conversations.starts[1:] - conversations.starts[:-1]
            if cut := int((lengths > self.hparams.block_size + 1).sum()):
                rank_zero_warn(
                    f"{cut} of the {len(lengths)} {split} conversations are longer than block_size + 1 = "
                    f"{self.hparams.block_size + 1} tokens (the longest: {int(lengths.max())}); each is cut there, its "
                    "tail neither trained on nor scored: raise model.block_size to keep them whole"
                )

    @property
    def chat_template(self) -> str | None:
        """The chat template the model is saved with: the one a conversation corpus was rendered with, else that of
        ``tokenizer_path`` (a chat model fine-tuned on plain text still chats); ``None`` if neither has one."""
        if self.meta.get("chat_template") is not None:
            return self.meta["chat_template"]
        template = source_template(self.hparams.tokenizer_path)
        return template.source if template is not None else None

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_byte_lengths(self) -> torch.Tensor:
        """UTF-8 bytes per token id, for bits-per-byte."""
        return torch.from_numpy(token_byte_lengths(self.tokenizer))

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self) -> dict:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # A generator of its own: a DataLoader otherwise draws its workers' base seed from the global torch RNG
        # each time it starts iterating, so dropout masks would depend on num_workers and on validation.
        generator = torch.Generator().manual_seed(self.hparams.seed)
        workers = self.hparams.num_workers
        return dict(num_workers=workers, pin_memory=on_gpu, persistent_workers=workers > 0, generator=generator)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rank, _ = self._rank_world()
        tokens = self.tokens["train"]
        if "train" in self.conversations:
            conversations = self.conversations["train"]
            dataset = ConversationBatches(
                tokens, conversations, hp.block_size, hp.batch_size, hp.seed, end_of_text(self.tokenizer), rank,
                all_targets=not hp.assistant_only_loss,
            )
            epoch_batches = max(1, len(conversations) // hp.batch_size)  # an epoch draws as many rows as there are conversations
        else:
            dataset = TrainWindows(tokens, hp.block_size, hp.batch_size, hp.seed, rank)
            epoch_batches = max(1, len(tokens) // (hp.batch_size * hp.block_size))  # as many windows as the split has tokens
        trainer = self.trainer
        step_based = trainer is not None and trainer.max_steps > 0
        # Step-based: one endless "epoch", batches keyed by their index in the run (see ResumableSampler).
        sampler = ResumableSampler(None if step_based else epoch_batches, epoch=trainer.current_epoch if trainer is not None else 0)

        def consumed() -> int:
            # Batches the fit loop has finished, in the run or in this epoch: Lightning's progress counters
            # (internal API, pinned by tests/test_lightning_internals.py), which it restores on resume.
            if trainer is None:
                return 0
            progress = trainer.fit_loop.epoch_loop.batch_progress
            return progress.total.processed if step_based else progress.current.processed

        return ResumableLoader(dataset, sampler=sampler, batch_size=None, consumed=consumed, **self._loader_kwargs())

    def val_dataloader(self, split: str = "val") -> DataLoader:
        rank, world = self._rank_world()
        batch_size = self.hparams.val_batch_size or self.hparams.batch_size
        if split in self.conversations:
            rows = ConversationRows(
                self.tokens[split], self.conversations[split], self.hparams.block_size, end_of_text(self.tokenizer), rank, world
            )
            return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=rows.collate, **self._loader_kwargs())
        dataset = ValWindows(self.tokens[split], self.hparams.block_size, rank, world)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.tokens:
            raise DataError(NO_TEST_SPLIT)
        return self.val_dataloader("test")
