"""Finding a run to continue: where ``--ckpt_path last`` points, and which MLflow run a checkpoint continues.

A run's checkpoints live in ``<trainer.default_root_dir>/<experiment id>/<run id>/checkpoints/`` (Lightning's
layout for an MLflow logger). Each checkpoint records its MLflow run id, so resuming from it continues
that run: the same metrics history, and the same checkpoint folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from jsonargparse import Namespace
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lm_lightning.checkpoint import LAST, RUN_ID_KEY, check_shape, load_checkpoint
from lm_lightning.errors import UserError
from lm_lightning.tracking.store import check_store, mlflow_client, resolve_tracking_uri

RESUME_LOCK = ".resume-{run_id}.lock"
"""Held, in ``trainer.default_root_dir`` (where the run writes its checkpoints), by the process that continues an
MLflow run: a second one is refused."""


def _mlflow_logger_args(logger_config: Any) -> Namespace | None:
    """The ``init_args`` of the configured logger if it is an MLflow logger, else ``None``."""
    if not isinstance(logger_config, Namespace) or "class_path" not in logger_config:
        return None
    module, name = logger_config.class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    return logger_config.init_args if issubclass(cls, MLFlowLogger) else None


def check_tracking_store(config: Namespace) -> None:
    """Refuse a tracking database that is not one before anything opens it (see ``check_store``)."""
    if (logger_args := _mlflow_logger_args(config.trainer.logger)) is not None:
        check_store(resolve_tracking_uri(logger_args.tracking_uri))


def _client(logger_args: Namespace):
    return mlflow_client(resolve_tracking_uri(logger_args.tracking_uri))


def find_last_checkpoint(config: Namespace, logger_args: Namespace | None) -> Path | None:
    """The ``last.ckpt`` that ``--ckpt_path last`` means: the most recently written one of the experiment
    (``<default_root_dir>/<experiment id>/*/checkpoints/last.ckpt``), or the one in ``last_checkpoint.dirpath``
    when that is set."""
    if config.last_checkpoint.dirpath:
        candidates = [Path(config.last_checkpoint.dirpath) / LAST]
    else:
        experiment = _client(logger_args).get_experiment_by_name(logger_args.experiment_name)
        if experiment is None:
            return None
        candidates = list((Path(config.trainer.default_root_dir) / experiment.experiment_id).glob(f"*/checkpoints/{LAST}"))
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def hold_resume_lock(run_id: str, root: str | Path) -> FileLock | None:
    """Lock the MLflow run ``run_id`` for the fit that continues it (the lock file in ``root``, the run's
    ``trainer.default_root_dir``), or refuse in one line if another process holds it: two resumes of one run at once
    would log the same steps twice. Released by ``release()``, or when the process ends however it ends (an
    ``flock``). Rank 0 holds it: the other processes of a distributed fit parse the same command line."""
    if rank_zero_only.rank != 0:
        return None
    Path(root).mkdir(parents=True, exist_ok=True)
    lock = FileLock(Path(root) / RESUME_LOCK.format(run_id=run_id), is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(
            f"another process is continuing MLflow run {run_id} (it holds {lock.lock_file}); wait for it to end, "
            "or stop it, before resuming the run again"
        ) from None
    return lock


def resolve_ckpt_path(config: Namespace, subcommand: str) -> FileLock | None:
    """Turn ``config.ckpt_path`` into a checkpoint file and, when fitting, point the MLflow logger at its run.

    Reads the checkpoint once (memory-mapped, ``weights_only``) before anything is built, so a missing,
    truncated or unsafe checkpoint, or one of another model shape, is refused at once and no run is touched.
    If the checkpoint's run is not in this tracking store (a checkpoint copied from elsewhere), or was deleted,
    training continues from it in a new run. A fit that continues a run holds :func:`hold_resume_lock`, returned
    for the caller to release when the fit ends (a fit into a new run needs none: nothing is shared).
    """
    if config.ckpt_path is None:
        return None
    logger_args = _mlflow_logger_args(config.trainer.logger)
    if config.ckpt_path == "last":
        if logger_args is None and not config.last_checkpoint.dirpath:
            return  # no MLflow run to find it by: Lightning resolves "last" in its own folders
        found = find_last_checkpoint(config, logger_args)
        if found is None:
            where = config.last_checkpoint.dirpath or f"experiment {logger_args.experiment_name!r}"
            rank_zero_warn(f"--ckpt_path last: no {LAST} found for {where}; starting from scratch")
            config.ckpt_path = None
            return None
        config.ckpt_path = str(found)
    checkpoint = load_checkpoint(config.ckpt_path, mmap=True)
    check_shape(checkpoint.get("hyper_parameters", {}), config.model.as_dict())  # before any run is touched
    run_id = checkpoint.get(RUN_ID_KEY)
    if subcommand != "fit" or logger_args is None or logger_args.run_id or not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = _client(logger_args).get_run(run_id)
    except MlflowException:
        rank_zero_warn(f"the MLflow run {run_id} of {config.ckpt_path} is not in this tracking store; logging to a new run")
        return None
    if run.info.lifecycle_stage == "deleted":
        rank_zero_warn(
            f"the MLflow run {run_id} of {config.ckpt_path} was deleted; logging to a new run (to continue that one "
            f"instead, restore it first: mlflow runs restore --run-id {run_id})"
        )
        return None
    lock = hold_resume_lock(run_id, config.trainer.default_root_dir)
    logger_args.run_id = run_id
    rank_zero_info(f"resuming from {config.ckpt_path}, continuing MLflow run {run_id}")
    return lock
