"""A tracking store that goes away or never was: training never stops for it, and nothing logged is lost."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import metric_history, only_run, run_cli
from lm_lightning.checkpoint import load_checkpoint
from lm_lightning.tracking.journal import Journal, JournaledClient

STEPS = 80
FAST = ["--trainer.log_every_n_steps", "1", "--samples.max_new_tokens", "8", "--trainer.logger.init_args.log_model", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1 (its own process group, so that stopping it stops its workers)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    args = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300  # starting takes seconds, a minute on a loaded machine
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the group of the process this test started
    server.wait()


def test_tracking_server_killed_mid_run_loses_nothing(tmp_path, corpus, tiny_config):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    exe = Path(sys.executable).with_name("lm-lightning")
    args = ["fit", "--config", str(tiny_config), "--data.path", str(corpus), "--trainer.max_steps", str(STEPS), *FAST,
            "--last_checkpoint.every_n_train_steps", "10"]
    fit = subprocess.Popen([str(exe), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(uri)
        while True:  # kill the server once the run has logged step 30
            assert fit.poll() is None, fit.communicate()[1][-3000:]
            experiment = client.get_experiment_by_name("lm_lightning")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and any(step >= 30 for step, _ in metric_history(client, runs[0].info.run_id, "train/loss")):
                break
            time.sleep(0.2)
        stop_server(server)
        killed_at = time.monotonic()
        _, stderr = fit.communicate(timeout=600)
    finally:
        if fit.poll() is None:
            fit.kill()
        if server.poll() is None:
            stop_server(server)
    # Training went on to the end while the server was away; its records wait in the run's journal.
    assert fit.returncode == 0, stderr[-3000:]
    run_id = runs[0].info.run_id
    (last,) = tmp_path.glob(f"runs/*/{run_id}/checkpoints/last.ckpt")
    assert load_checkpoint(last)["global_step"] == STEPS
    journal = last.parent.parent / "mlflow-journal.jsonl"
    assert journal.is_file()
    assert f"python -m lm_lightning.tracking.journal {journal}" in " ".join(stderr.split())
    assert "Traceback" not in stderr

    time.sleep(max(0.0, 10 - (time.monotonic() - killed_at)))  # back 10 s (or more) after it went away
    server = start_server(tmp_path, port)
    try:
        replay = subprocess.run([sys.executable, "-m", "lm_lightning.tracking.journal", str(journal)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert replay.returncode == 0, replay.stderr[-3000:]
        assert not journal.exists()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [step for step, _ in metric_history(client, run_id, "train/loss")] == list(range(STEPS))  # no step lost
        assert [step for step, _ in metric_history(client, run_id, "val/loss")] == [9, 19, 29, 39, 49, 59, 69, 79]
    finally:
        stop_server(server)


class FlakyClient:
    """A client whose store is away for the first ``down`` calls."""

    def __init__(self, down: int):
        self.down, self.calls = down, []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if self.down:
            self.down -= 1
            raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception ConnectionError")
        self.calls.append([(m.key, m.value, m.step) for m in metrics])


def test_journal_keeps_writes_in_order_and_sends_them_when_the_store_is_back(tmp_path, monkeypatch):
    monkeypatch.setattr("lm_lightning.tracking.journal.RETRY_AFTER_S", 0.0)
    flaky = FlakyClient(down=3)
    client = JournaledClient(flaky, Journal(tmp_path / "j.jsonl", "http://127.0.0.1:1"))
    for step in range(5):
        with pytest.warns(UserWarning, match="cannot reach") if step == 0 else nullcontext():
            client.log_batch(run_id="run", metrics=[Metric("train/loss", float(step), 0, step)])
    # steps 0-2 replayed (in one request) before step 3
    assert flaky.calls == [[("train/loss", float(s), s) for s in range(3)], [("train/loss", 3.0, 3)], [("train/loss", 4.0, 4)]]
    assert not (tmp_path / "j.jsonl").exists()


def test_tracking_uri_down_from_the_start_is_one_line(corpus, tiny_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = run_cli("fit", "--config", str(tiny_config), "--data.path", str(corpus))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the MLflow tracking store http://127.0.0.1:9;"), last
    assert "Traceback" not in result.stderr


def test_a_tracking_database_that_is_not_one_is_one_line(corpus, tiny_config, tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"\x00garbage, not SQLite" * 100)
    result = run_cli("fit", "--config", str(tiny_config), "--data.path", str(corpus))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'mlflow.db'} is not an SQLite database, so not an MLflow one; move it away or set another tracking URI"
    )


def test_a_refused_resume_leaves_the_run_as_it_was(corpus, tiny_config, mlflow_store, tmp_path, capsys):
    from conftest import CHINESE, run_main

    assert run_main("fit", "--config", str(tiny_config), "--data.path", str(corpus), "--trainer.max_steps", "5", "--samples.prompts", "[]") == 0
    client = MlflowClient(mlflow_store)
    before = only_run(client, "lm_lightning")
    other = tmp_path / "other.txt"
    other.write_text(CHINESE * 200, encoding="utf-8")
    code = run_main("fit", "--config", str(tiny_config), "--data.path", str(other), "--trainer.max_steps", "10", "--ckpt_path", "last")
    assert code == 2
    assert "tokenizer differs" in capsys.readouterr().err.strip().splitlines()[-1]
    after = only_run(client, "lm_lightning")
    assert after.info.status == before.info.status == "FINISHED"
    assert "error" not in after.data.tags


@pytest.mark.parametrize("where", ["directory", "missing-folder"])
def test_a_tracking_database_path_that_cannot_be_one_is_one_line(corpus, tiny_config, tmp_path, monkeypatch, capsys, where):
    from conftest import run_main

    path = tmp_path / ("store.db" if where == "directory" else "no/such/folder/mlflow.db")
    if where == "directory":
        path.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    start = time.monotonic()
    assert run_main("fit", "--config", str(tiny_config), "--data.path", str(corpus)) == 2
    assert time.monotonic() - start < 60  # no minutes of retries
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the {'tracking database' if where == 'directory' else 'folder of the tracking database'} {path}")
    assert "Traceback" not in err


def test_resuming_a_deleted_run_logs_to_a_new_one_and_a_second_resume_at_once_is_refused(corpus, tiny_config, mlflow_store, capsys):
    from conftest import run_main
    from lm_lightning.tracking.runs import hold_resume_lock

    args = ["fit", "--config", str(tiny_config), "--data.path", str(corpus), "--samples.prompts", "[]"]
    assert run_main(*args, "--trainer.max_steps", "5") == 0
    client = MlflowClient(mlflow_store)
    first = only_run(client, "lm_lightning")
    client.delete_run(first.info.run_id)  # as the UI's delete does: the run is kept until garbage-collected
    with pytest.warns(UserWarning, match=f"run {first.info.run_id} .* was deleted; logging to a new run"):
        assert run_main(*args, "--trainer.max_steps", "8", "--ckpt_path", "last") == 0
    (second,) = client.search_runs([first.info.experiment_id])
    assert second.info.run_id != first.info.run_id and second.data.metrics["val/loss"] > 0
    assert client.get_run(first.info.run_id).info.lifecycle_stage == "deleted"

    logged = metric_history(client, second.info.run_id, "val/loss")
    root = str(Path("runs").resolve())
    holder = subprocess.Popen(  # another process continuing the run
        [sys.executable, "-c", f"from lm_lightning.tracking.runs import hold_resume_lock; lock = hold_resume_lock({second.info.run_id!r}, "
         f"{root!r}); print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_main(*args, "--trainer.max_steps", "12", "--ckpt_path", "last") == 2
        assert f"another process is continuing MLflow run {second.info.run_id}" in capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        holder.kill()
        holder.wait()
    hold_resume_lock(second.info.run_id, root).release()  # free again once the other process is gone
    assert metric_history(client, second.info.run_id, "val/loss") == logged  # the refused resume logged nothing


@pytest.mark.parametrize("damage", ["emptied", "overwritten"])
def test_a_database_damaged_under_a_run_keeps_its_writes_in_the_journal(tmp_path, damage):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "a", 1.0, step=0)
    database = tmp_path / "mlflow.db"
    if damage == "emptied":
        database.write_bytes(b"")
    else:  # its pages overwritten past the header, as a half-finished copy leaves it
        data = bytearray(database.read_bytes())
        data[100:] = b"\xff" * (len(data) - 100)
        database.write_bytes(bytes(data))
    journal = Journal(tmp_path / "journal.jsonl", uri)
    journaled = JournaledClient(client, journal)
    with pytest.warns(UserWarning, match="training goes on, and the run's records are kept in"):
        journaled.log_metric(run.info.run_id, "a", 2.0, step=1)
    journaled.log_metric(run.info.run_id, "a", 3.0, step=2)
    assert journal.pending == 2
