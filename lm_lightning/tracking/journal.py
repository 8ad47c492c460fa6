"""A tracking server that goes away must not stop training: the run's MLflow writes that cannot reach it are kept
in a local journal (JSON lines, with copies of the artifacts) and replayed, in order, once it answers again.

If it never comes back while the run lasts, replay the journal later with::

    python -m lm_lightning.tracking.journal runs/<experiment id>/<run id>/mlflow-journal.jsonl
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lm_lightning.errors import UserError
from lm_lightning.files import atomic_write_text

# The client methods that write to a run; the others (reads) are not journaled.
WRITES = (
    "log_batch", "log_metric", "log_param", "set_tag", "log_text", "log_table", "log_artifact", "log_artifacts", "set_terminated", "update_run",
)
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch
RETRY_AFTER_S = 10.0  # after a failed write, further writes go straight to the journal for this long
# MLflow retries a request for minutes by default (7 retries, backoff factor 2, 120 s timeout).
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries in this process (unless set by the user): an unreachable server costs seconds."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


BROKEN_DATABASE = ("database disk image is malformed", "file is not a database", "no such table", "unable to open database file")
"""What SQLite says of a database file that was truncated, overwritten or removed under a running fit. MLflow's
SQLAlchemy store passes some of these on as ``BAD_REQUEST``, as if the request were wrong."""


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking store could not be reached, or read (rather than that a request was wrong)."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import DatabaseError

    if isinstance(error, (requests.RequestException, OSError, DatabaseError)):
        return True
    if not isinstance(error, MlflowException):
        return False
    return error.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE") or any(m in str(error) for m in BROKEN_DATABASE)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


@contextmanager
def store_errors(tracking_uri: str) -> Iterator[None]:
    """Turn a tracking store that cannot be reached or read into one line naming it."""
    from sqlalchemy.exc import DatabaseError

    try:
        yield
    except DatabaseError as e:
        database = tracking_uri.removeprefix("sqlite:///")
        raise UserError(f"{database} is not a readable MLflow database ({_one_line(e.orig)}); move it away or set another tracking URI") from None
    except Exception as e:
        if not unreachable(e):
            raise
        raise UserError(
            f"cannot reach the MLflow tracking store {tracking_uri}; start it, or set "
            "MLFLOW_TRACKING_URI or trainer.logger.init_args.tracking_uri to one that is up"
        ) from None


def _encode(value: Any) -> Any:
    from mlflow.entities import Metric, Param, RunTag

    if isinstance(value, Metric):
        return {"metric": [value.key, value.value, value.timestamp, value.step]}
    if isinstance(value, (Param, RunTag)):
        return {type(value).__name__.lower(): [value.key, value.value]}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    from mlflow.entities import Metric, Param, RunTag

    if isinstance(value, dict) and len(value) == 1 and (kind := next(iter(value))) in ("metric", "param", "runtag"):
        return {"metric": Metric, "param": Param, "runtag": RunTag}[kind](*value[kind])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _metrics_only(entry: dict) -> bool:
    """Lightning's metric writes: ``log_batch(run_id=..., metrics=[...])``."""
    return entry["method"] == "log_batch" and not entry["args"] and set(entry["kwargs"]) == {"run_id", "metrics"}


class Journal:
    """The writes to one MLflow run that could not reach the tracking store, in order (``<path>``, JSON lines),
    and copies of the files they upload (``<path>.files/``)."""

    def __init__(self, path: Path | Callable[[], Path], tracking_uri: str):
        self._path = path
        self.tracking_uri = tracking_uri
        self._offline_until = 0.0

    @property
    def path(self) -> Path:
        return Path(self._path() if callable(self._path) else self._path)

    @property
    def files(self) -> Path:
        return self.path.with_name(self.path.name + ".files")

    def _entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, method: str, args: tuple, kwargs: dict) -> None:
        """Keep the call for later; a file it uploads is copied now (it may be a temporary one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if method in ("log_artifact", "log_artifacts"):
            args, local = list(args), Path(args[1])
            self.files.mkdir(parents=True, exist_ok=True)
            copy = Path(tempfile.mkdtemp(dir=self.files)) / local.name
            (shutil.copytree if local.is_dir() else shutil.copy2)(local, copy)
            args[1] = str(copy)
        line = json.dumps({"uri": self.tracking_uri, "method": method, "args": _encode(args), "kwargs": _encode(kwargs)})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def replay(self, client) -> int:
        """Send the kept calls through ``client``, oldest first (consecutive metrics in one request); those that
        fail stay. The number sent."""
        entries = self._entries()
        done = 0
        while done < len(entries):
            batch, n = 1, len(entries[done]["kwargs"].get("metrics", []))
            while done + batch < len(entries) and _metrics_only(entries[done]) and _metrics_only(entries[done + batch]):
                n += len(entries[done + batch]["kwargs"]["metrics"])
                if n > MAX_METRICS_PER_BATCH:
                    break
                batch += 1
            try:
                if batch > 1:
                    metrics = [m for e in entries[done : done + batch] for m in _decode(e["kwargs"]["metrics"])]
                    client.log_batch(entries[done]["kwargs"]["run_id"], metrics=metrics)
                else:
                    getattr(client, entries[done]["method"])(*_decode(entries[done]["args"]), **_decode(entries[done]["kwargs"]))
            except BaseException:
                atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in entries[done:]), "MLflow journal")
                raise
            done += batch
        if entries:
            self.path.unlink()
            shutil.rmtree(self.files, ignore_errors=True)
        return len(entries)

    def _went_offline(self, error: BaseException) -> None:
        if not self._offline_until:
            rank_zero_warn(
                f"cannot reach the MLflow tracking store {self.tracking_uri} ({_one_line(error)}); training goes on, "
                f"and the run's records are kept in {self.path} until it answers"
            )
        self._offline_until = time.monotonic() + RETRY_AFTER_S

    def flush(self, client) -> bool:
        """Replay the journal now; whether it is empty after (``False``: the store is still unreachable)."""
        try:
            if sent := self.replay(client):
                rank_zero_info(f"MLflow tracking store {self.tracking_uri} is back: sent the {sent} records kept in {self.path}")
            return True
        except Exception as e:
            if not unreachable(e):
                raise
            self._went_offline(e)
            return False

    def call(self, client, method: str, *args, **kwargs) -> Any:
        """``client.<method>(*args, **kwargs)`` after replaying the journal; kept in the journal instead when the
        store cannot be reached (or could not be, less than ``RETRY_AFTER_S`` ago)."""
        if time.monotonic() >= self._offline_until and self.flush(client):
            try:
                return getattr(client, method)(*args, **kwargs)
            except Exception as e:
                if not unreachable(e):
                    raise
                self._went_offline(e)
        self.append(method, args, kwargs)
        return None

    @property
    def pending(self) -> int:
        return len(self._entries())


class JournaledClient:
    """An ``MlflowClient`` whose writes go through a ``Journal``: they never fail for an unreachable store."""

    def __init__(self, client, journal: Journal):
        self._client = client
        self.journal = journal

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name not in WRITES:
            return attribute
        return lambda *args, **kwargs: self.journal.call(self._client, name, *args, **kwargs)

    def flush(self) -> bool:
        """Send the journal now; whether it is empty after."""
        return self.journal.flush(self._client)


def main(argv: list[str] | None = None) -> None:
    """``python -m lm_lightning.tracking.journal JOURNAL``: send a run's kept records to its tracking store."""
    from mlflow.tracking import MlflowClient

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m lm_lightning.tracking.journal runs/<experiment id>/<run id>/mlflow-journal.jsonl")
    path = Path(argv[0])
    entries = Journal(path, "")._entries()
    if not entries:
        print(f"{path}: nothing to replay")
        return
    bound_http_retries()
    uri = entries[0]["uri"]
    try:
        with store_errors(uri):
            sent = Journal(path, uri).replay(MlflowClient(uri))
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"sent {sent} records to {uri}")


if __name__ == "__main__":
    main()
