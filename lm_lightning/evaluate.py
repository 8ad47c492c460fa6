"""Scoring a model on text: every token of the files once, in windows of the model's context, as training reads
documents (joined with end-of-text tokens). Loss, perplexity and bits per UTF-8 byte of the text, exact. A corpus of
conversations is scored as validation scores it: each conversation on its own, the assistant's tokens only."""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lm_lightning.chat_template import ChatError, ChatTemplate
from lm_lightning.data.cache import Conversations, iter_batches, iter_conversation_ids, iter_document_ids
from lm_lightning.data.corpus import DataError, is_conversation_corpus, resolve_sources
from lm_lightning.data.windows import conversation_rows
from lm_lightning.errors import UserError
from lm_lightning.model import GPT
from lm_lightning.tokenizer import end_of_text, token_byte_lengths


@dataclass
class Scores:
    loss: float
    """Mean cross-entropy per token, in nats."""
    ppl: float
    """Perplexity, ``exp(loss)``."""
    bpb: float
    """Bits per UTF-8 byte of the text."""
    tokens: int
    bytes: int
    corpus_sha256: str


class Corpus(NamedTuple):
    """The text to score, as token ids."""

    tokens: np.ndarray
    """The ids of every document, each followed by end-of-text, after one end-of-text that starts the first."""
    sha256: str
    """The corpus hash that training's token cache records."""
    n_bytes: int
    """UTF-8 bytes of the text."""
    conversations: Conversations | None = None
    """For a corpus of conversations (``tokens`` their renderings, one after the other): the assistant's tokens
    (the mask) and where each conversation starts."""


def read_tokens(path: str, tokenizer: Tokenizer, jsonl_field: str = "text", template: ChatTemplate | None = None) -> Corpus:
    """The :class:`Corpus` of ``path`` (a file, folder or glob, as ``data.path`` reads it); conversations are
    rendered with ``template`` (the model's chat template)."""
    sources = resolve_sources(path)
    if is_conversation_corpus(sources, jsonl_field):
        return _read_conversations(path, sources, tokenizer, jsonl_field, template)
    ids, corpus_hash, n_bytes = [np.array([end_of_text(tokenizer)], dtype=np.int64)], hashlib.sha256(), 0

    def seen(text: str) -> None:
        nonlocal n_bytes
        data = text.encode("utf-8")
        corpus_hash.update(data)
        n_bytes += len(data)

    for source in sources:
        ids.extend(iter_document_ids(source, jsonl_field, tokenizer, np.int64, seen))
    if n_bytes == 0:
        raise DataError(f"{path} holds no text (0 bytes): there is nothing to score; pass a file with text in it")
    return Corpus(np.concatenate(ids), corpus_hash.hexdigest(), n_bytes)


def _read_conversations(path, sources, tokenizer, jsonl_field, template) -> Corpus:
    if template is None:
        raise ChatError(f"{path} holds conversations, and the model has no chat template to render them; score plain text")
    corpus_hash, ids, masks, starts = hashlib.sha256(), [], [], [0]
    for source in sources:
        for conversation, mask in iter_conversation_ids(source, jsonl_field, tokenizer, template, np.int64, lambda t: corpus_hash.update(t.encode("utf-8"))):
            ids.append(conversation)
            masks.append(mask)
            starts.append(starts[-1] + len(conversation))
    tokens, mask = np.concatenate(ids), np.concatenate(masks)
    # Bytes of the assistant's text: what bits per byte is over, as in training's validation.
    n_bytes = int(token_byte_lengths(tokenizer)[tokens[mask.astype(bool)]].sum())
    return Corpus(tokens, corpus_hash.hexdigest(), n_bytes, Conversations(mask, np.asarray(starts, dtype=np.int64)))


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, new)`` for each window over ``n`` tokens: it reads ``tokens[begin:end]``, predicts
    ``tokens[begin+1:end+1]`` and scores only its last ``new`` targets, so every target is scored once; with
    ``stride < block_size`` the windows overlap and each target is scored with more context."""
    spans, scored = [], 0
    for begin in range(0, n - 1, stride):
        end = min(begin + block_size, n - 1)
        spans.append((begin, end, end - scored))
        scored = end
        if end == n - 1:
            break
    return spans


@torch.inference_mode()
def score(model: GPT, tokens: np.ndarray, stride: int | None = None, batch_size: int = 8) -> tuple[float, int]:
    """Summed nats and the number of target tokens of ``model`` on ``tokens``."""
    block_size = model.config.block_size
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise UserError(f"stride={stride} must be between 1 and the model's block_size ({block_size})")
    if len(tokens) < 2:
        raise DataError("the text holds no tokens to score")
    data = torch.from_numpy(tokens).to(model.lm_head.weight.device)
    nats, n_tokens = 0.0, 0
    spans = windows(len(tokens), block_size, stride)
    # Batches of windows of one length: all but the last window are block_size long.
    for group in (spans[:-1], spans[-1:]):
        for batch in iter_batches(group, batch_size):
            inputs = torch.stack([data[b:e] for b, e, _ in batch])
            targets = torch.stack([data[b + 1 : e + 1] for b, e, _ in batch])
            logits = model.forward(inputs).float()
            losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            for row, (_, _, new) in enumerate(batch):
                nats += losses[row, -new:].double().sum().item()
                n_tokens += new
    return nats, n_tokens


@torch.inference_mode()
def score_conversations(
    model: GPT, tokens: np.ndarray, conversations: Conversations, tokenizer: Tokenizer, batch_size: int = 8
) -> tuple[float, int, int]:
    """Summed nats over the assistant's tokens of each conversation, read alone from its start and cut to the model's
    ``block_size + 1`` tokens (as validation reads them); the number of tokens scored and their UTF-8 bytes."""
    block_size, device, pad_id = model.config.block_size, model.lm_head.weight.device, end_of_text(tokenizer)
    table = torch.from_numpy(token_byte_lengths(tokenizer))
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for batch in iter_batches(range(len(conversations)), batch_size):
        ids, trained = conversation_rows(tokens, conversations, batch, block_size + 1, pad_id)
        ids, trained = ids.to(device), trained[:, 1:].to(device)
        logits = model.forward(ids[:, :-1]).float()
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nats += losses[trained].double().sum().item()
        n_tokens += int(trained.sum())
        n_bytes += int(table[ids[:, 1:][trained].cpu()].sum())
    return nats, n_tokens, n_bytes


def evaluate_model(
    model: GPT, tokenizer: Tokenizer, path: str, stride: int | None = None, batch_size: int = 8, template: ChatTemplate | None = None
) -> Scores:
    """``Scores`` of ``model`` on the text of ``path`` (a file, folder or glob, as ``data.path``); a corpus of
    conversations (rendered with ``template``) on the assistant's tokens, each conversation alone (``stride`` unused)."""
    corpus = read_tokens(path, tokenizer, template=template)
    n_bytes = corpus.n_bytes
    if corpus.conversations is not None:
        nats, n_tokens, n_bytes = score_conversations(model, corpus.tokens, corpus.conversations, tokenizer, batch_size)
        if cut := int(corpus.conversations.mask.sum()) - n_tokens:
            warnings.warn(f"{cut} assistant tokens are past the model's block_size in their conversation; not scored", stacklevel=2)
        if not n_tokens:
            raise DataError(f"{path} has no assistant token within the model's block_size: there is nothing to score")
    else:
        nats, n_tokens = score(model, corpus.tokens, stride, batch_size)
    loss = nats / n_tokens
    # Bits per byte of the text itself: a sentencepiece tokenizer's tokens also spell the space it puts before
    # each text (``▁``), which is no byte of the text.
    return Scores(loss, math.exp(loss), nats / math.log(2) / max(n_bytes, 1), n_tokens, n_bytes, corpus.sha256)


def log_evaluation(
    scores: Scores,
    ckpt_path: str,
    data_path: str,
    source_run_id: str | None,
    stride: int,
    experiment_name: str | None,
    tracking_uri: str | None,
) -> str:
    """Record ``scores`` as an MLflow run (tag ``command=evaluate``) named after the text (``evaluate-tinyshakespeare-
    a3f1``), with the text as its dataset input (context ``evaluation``); in the checkpoint's experiment unless
    ``experiment_name`` is given. A run of the checkpoint's in the same experiment is its parent (the runs table shows
    the evaluation under it); in another experiment of this store, the note links to it. Returns the run id."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

    from lm_lightning.tracking.datasets import corpus_name, evaluation_input
    from lm_lightning.tracking.names import stamp
    from lm_lightning.tracking.store import mlflow_client, resolve_tracking_uri
    from lm_lightning.tracking.ui import prepare_experiment

    client = mlflow_client(resolve_tracking_uri(tracking_uri))
    source = None
    if source_run_id:
        try:
            source = client.get_run(source_run_id)
        except MlflowException:
            pass  # a checkpoint from another tracking store
    if experiment_name is None and source is not None:
        experiment_id = source.info.experiment_id
    else:
        name = experiment_name or "lm_lightning"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        prepare_experiment(client, experiment_id)
    tags = {
        "command": "evaluate",
        "checkpoint": str(Path(ckpt_path).resolve()),
        "data.path": data_path,
        "corpus_sha256": scores.corpus_sha256,
        **({"source_run_id": source_run_id} if source_run_id else {}),
    }
    if source is not None and source.info.experiment_id == experiment_id:
        tags[MLFLOW_PARENT_RUN_ID] = source_run_id
    elif source is not None:
        link = f"#/experiments/{source.info.experiment_id}/runs/{source_run_id}"
        tags[MLFLOW_RUN_NOTE] = f"Scores the checkpoint of run [{source.info.run_name}]({link})."
    run_name = f"evaluate-{corpus_name(data_path)}-{stamp()}"
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    client.log_inputs(run_id, datasets=[evaluation_input(data_path, scores.corpus_sha256, scores.tokens, scores.bytes)])
    client.log_param(run_id, "stride", stride)
    for key in ("loss", "ppl", "bpb"):
        client.log_metric(run_id, f"eval/{key}", getattr(scores, key))
    client.set_terminated(run_id)
    return run_id
