"""The MLflow tracking store: where runs are recorded, and opening it safely. Imports mlflow only when a client is
opened, so that the light commands can record runs without Lightning's logger."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lm_lightning.errors import UserError
from lm_lightning.files import file_lock

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's default ``sqlite:///mlflow.db``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` tracking URI; ``None`` for any other store, or an in-memory one."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    return Path(tracking_uri[len("sqlite:///") :])


@contextmanager
def store_init_lock(tracking_uri: str) -> Iterator[None]:
    """Holds ``<database>.lock`` while an sqlite tracking store is opened.

    MLflow creates a new database's tables when it first connects (``SqlAlchemyStore.__init__``), with nothing
    to keep two processes apart: two runs started at once in a fresh folder both fail ("table ... already
    exists"). A separate lock file, because closing any descriptor of the database itself would drop
    SQLite's own POSIX locks on it.
    """
    if (database := sqlite_database(tracking_uri)) is None:
        yield
        return
    with file_lock(database.with_name(database.name + ".lock")):
        yield


def check_store(tracking_uri: str) -> None:
    """Refuse an sqlite tracking database that is not one, or cannot be one, naming it: MLflow's own errors are a
    parser message, or minutes of retries then a traceback (a directory, a missing folder)."""
    database = sqlite_database(tracking_uri)
    if database is None:
        return
    if database.is_dir():
        raise UserError(f"the tracking database {database} is a directory; point the tracking URI at a file in it, e.g. sqlite:///{database / 'mlflow.db'}")
    if not database.parent.is_dir():
        raise UserError(f"the folder of the tracking database {database} does not exist; create it, or set another tracking URI")
    if database.is_file() and database.stat().st_size:
        with open(database, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise UserError(f"{database} is not an SQLite database, so not an MLflow one; move it away or set another tracking URI")


def mlflow_client(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri``, opened under ``store_init_lock``."""
    from mlflow.tracking import MlflowClient

    check_store(tracking_uri)
    with store_init_lock(tracking_uri):
        return MlflowClient(tracking_uri)


EXPERIMENT_KIND = "mlflow.experimentKind"


def mark_model_training(client, experiment_id: str) -> None:
    """Tag the experiment's kind as model training (``mlflow.experimentKind``), unless it was chosen already. MLflow
    3.17's UI no longer opens an experiment by this tag but by the browser's workflow type: ``tracking/ui.py``."""
    if EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")
