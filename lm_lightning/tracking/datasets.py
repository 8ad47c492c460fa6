"""The corpus as MLflow dataset inputs of a run: one dataset per split, with the context MLflow's UI shows and filters
by (``training``, ``validation``, ``evaluation``), its digest and where it was read from."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

BUILTIN = "builtin:pydoc_data"
"""``data.path`` of the built-in corpus (Python's reference documentation, ``pydoc_data.topics``)."""
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
"""MLflow's dataset context of each split (``mlflow.data.context``; the names ``mlflow.log_input`` documents)."""


def corpus_name(data_path: str | None) -> str:
    """What the corpus is called in MLflow: the file or folder's stem (``tinyshakespeare``), ``pydoc_data`` for the
    built-in one, the pattern for a glob."""
    if not data_path or data_path == BUILTIN:
        return "pydoc_data"
    path = Path(str(data_path))
    return path.name if any(c in path.name for c in "*?[") else path.name.split(".")[0] or path.name


def split_digest(corpus_sha256: str, split: str, fractions: tuple[float, ...] = ()) -> str:
    """A short digest of one split: the corpus's hash, the split and where the split points lie. MLflow keeps one
    dataset per (name, digest) and one input per dataset and run, so the splits of one corpus need digests of their own."""
    return hashlib.sha256(json.dumps([corpus_sha256, split, *fractions]).encode()).hexdigest()[:12]


def dataset_entity(data_path: str | None, digest: str, profile: dict):
    """An MLflow ``Dataset`` entity for the text at ``data_path``: a local source with its absolute path (for the
    built-in corpus, the file of ``pydoc_data.topics`` it is read from)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    if not data_path or data_path == BUILTIN:
        import pydoc_data.topics

        uri = pydoc_data.topics.__file__
    else:
        path = Path(str(data_path)).expanduser()
        uri = str(path if any(c in str(path) for c in "*?[") else path.resolve())
    with warnings.catch_warnings():  # MLflow registers the local source twice, then warns that it matches twice
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    entity = MetaDataset(source, name=corpus_name(data_path), digest=digest)._to_mlflow_entity()
    return Dataset(entity.name, entity.digest, entity.source_type, entity.source, entity.schema, json.dumps(profile))


def corpus_inputs(data_path: str | None, meta: dict, splits: tuple[str, ...], fractions: tuple[float, float]) -> list:
    """The dataset inputs of a run that reads ``splits`` (``train``, ``val``, ``test``) of the corpus of a token
    cache's ``meta``, split at ``fractions`` (validation, test): one per split, each with its token count as the
    dataset's profile."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for split in splits:
        tokens = meta.get(f"{split}_tokens")
        if not tokens:
            continue
        digest = split_digest(meta["corpus_sha256"], split, fractions)
        entity = dataset_entity(data_path, digest, {"tokens": int(tokens), "tokenizer": meta.get("tokenizer")})
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[split])]))
    return inputs


def evaluation_input(data_path: str, corpus_sha256: str, tokens: int, n_bytes: int):
    """The dataset input of an ``evaluate`` run: every token of ``data_path``, context ``evaluation``."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entity = dataset_entity(data_path, split_digest(corpus_sha256, "all"), {"tokens": tokens, "bytes": n_bytes})
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])
