"""Exact resume through kill -9 and SIGTERM, with real processes, real checkpoints and a real MLflow store.

One run of 32 steps is trained straight through. The same run is trained again, killed with SIGKILL, resumed
and stopped with SIGTERM, then resumed with two data-loading workers to the end: its per-step training losses
must equal the straight run's, in one MLflow run.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import metric_history, only_run, run_folder, run_main, workdir
from lm_lightning.checkpoint import load_checkpoint

STEPS, EVERY = 32, 4
TRAIN = [
    "fit", "--config", "tiny.yaml", "--data.path", "corpus.txt",
    "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "8", "--trainer.log_every_n_steps", "1",
    "--model.dropout", "0.1",  # dropout draws random numbers every step: the RNG state must resume too
    "--last_checkpoint.every_n_train_steps", str(EVERY),
]


def start(*args: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("lm-lightning")
    return subprocess.Popen([str(exe), *TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_save(path: Path, after: float, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``path`` is (re)written later than ``after``."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.stat().st_mtime > after):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def story(tmp_path_factory, mlflow_template):
    root = run_folder(tmp_path_factory, mlflow_template, "resume")
    facts = {}
    with workdir(root) as uri:
        client = MlflowClient(uri)
        assert run_main(*TRAIN, "--trainer.logger.init_args.experiment_name", "straight", "--trainer.default_root_dir", "straight") == 0
        facts["straight"] = dict(metric_history(client, only_run(client, "straight").info.run_id, "train/loss"))

        resumed = ["--trainer.logger.init_args.experiment_name", "resumed"]
        killed = start(*resumed)
        (last,) = _wait_for_glob(root, "runs/*/*/checkpoints/last.ckpt", killed)
        run_id = only_run(client, "resumed").info.run_id
        while not any(step >= EVERY for step, _ in metric_history(client, run_id, "train/loss")):
            assert killed.poll() is None, killed.communicate()[1][-3000:]
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)  # past the first checkpoint, before the next one (unless very fast)
        killed.wait()
        facts["killed"] = {
            "ckpt_step": load_checkpoint(last)["global_step"],  # loads whole: never a partial file
            "logged": metric_history(client, run_id, "train/loss"),
            "status": client.get_run(run_id).info.status,
        }

        assert facts["killed"]["status"] == "RUNNING", "the run finished before it could be killed"
        saved_at = last.stat().st_mtime
        stopped = start(*resumed, "--ckpt_path", "last")
        wait_for_save(last, saved_at, stopped)  # resumed and saved again: now stop it
        stopped.send_signal(signal.SIGTERM)
        _, stderr = stopped.communicate(timeout=120)
        facts["sigterm"] = {
            "returncode": stopped.returncode,
            "stderr": stderr,
            "ckpt_step": load_checkpoint(last)["global_step"],
            "logged": metric_history(client, run_id, "train/loss"),
            "status": client.get_run(run_id).info.status,
        }

        facts["returncode"] = run_main(*TRAIN, *resumed, "--ckpt_path", "last", "--data.num_workers", "2")
        facts["run"] = client.get_run(run_id)
        facts["resumed"] = metric_history(client, run_id, "train/loss")
        facts["artifacts"] = {a.path for a in client.list_artifacts(run_id)}
        facts["checkpoints"] = sorted(p.relative_to(root).as_posix() for p in root.glob("runs/**/*.ckpt"))
        facts["run_dir"] = last.parent.relative_to(root).as_posix()
    return facts


def _wait_for_glob(root: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while not (found := list(root.glob(pattern))):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"nothing matched {pattern}"
        time.sleep(0.01)
    return found


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(story):
    killed = story["killed"]
    assert killed["status"] == "RUNNING"  # nothing could mark it: the resume will
    steps_done = killed["logged"][-1][0] + 1  # train/loss at step s is logged after optimizer step s + 1
    lost = steps_done - killed["ckpt_step"]
    print(f"kill -9 after {steps_done} steps: last.ckpt at step {killed['ckpt_step']}, {lost} steps lost")
    assert 0 < killed["ckpt_step"] < STEPS and 0 <= lost <= EVERY


def test_sigterm_saves_a_checkpoint_and_marks_the_run_killed(story):
    sigterm = story["sigterm"]
    assert sigterm["returncode"] == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in sigterm["stderr"] and "Traceback" not in sigterm["stderr"]
    assert sigterm["status"] == "KILLED"
    # Saved where it stopped: every step it logged is in the checkpoint, none lost.
    assert sigterm["ckpt_step"] == sigterm["logged"][-1][0] + 1 < STEPS


def test_resumed_run_reproduces_the_straight_run_exactly(story):
    assert story["returncode"] == 0
    straight, resumed = story["straight"], story["resumed"]
    assert sorted(straight) == list(range(STEPS)) and {s for s, _ in resumed} == set(straight)
    # Steps redone after the kill are logged twice; both values must equal the straight run's.
    diff = max(abs(value - straight[step]) for step, value in resumed)
    print(f"max |loss(resumed) - loss(straight)| over {len(resumed)} logged steps: {diff:.3g}")
    assert diff <= 1e-6


def test_one_mlflow_run_one_checkpoint_folder(story):
    run = story["run"]
    assert run.info.status == "FINISHED"
    assert "data.num_workers" not in run.data.params  # how it ran, not what it is: the config artifacts keep it
    assert run.data.params["model.n_layer"] == "2"
    assert {"config.yaml", "config-resume-1.yaml", "config-resume-2.yaml"} <= story["artifacts"]
    assert not {"best", "last"} & story["artifacts"]  # checkpoints are stored once, in the run folder
    run_dir = f"runs/{run.info.experiment_id}/{run.info.run_id}/checkpoints"
    assert story["run_dir"] == run_dir
    assert story["checkpoints"] == [f"{run_dir}/best.ckpt", f"{run_dir}/last.ckpt"]
