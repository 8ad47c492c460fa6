"""``lm-lightning sweep``: real trials in subprocesses, a real MLflow store and Optuna study in a temporary folder."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import run_cli, run_main

ROOT = Path(__file__).resolve().parents[1]
LR_RANGE = {"model.learning_rate": {"low": 1e-3, "high": 2e-2, "log": True}, "model.n_layer": {"low": 1, "high": 2}}


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    """Trials on one thread each: on 2 shared cores two OpenMP threads wait on each other."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def sweep(tiny_config: Path, corpus: Path, space: dict, *flags: str):
    # No text samples and no servable model per trial: what a trial records beyond its metrics is not under test.
    return run_cli("sweep", "--config", str(tiny_config), "--data.path", str(corpus), "--trainer.max_steps", "20",
                   "--samples.prompts", "[]", "--trainer.logger.init_args.log_model", "false",
                   "--sweep.space", json.dumps(space), *flags)


def runs_by_role(client: MlflowClient, experiment: str = "lm_lightning") -> tuple[list, list]:
    """(parent runs, child runs) of an experiment."""
    experiment = client.get_experiment_by_name(experiment)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in runs if "sweep" in r.data.tags], [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def cache_files() -> dict[str, int]:
    cache = Path(os.environ["LM_LIGHTNING_CACHE"])
    return {str(p): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}


def test_sweep_continues_on_rerun_and_best_yaml_trains_to_its_value(mlflow_store, tiny_config, corpus):
    first = sweep(tiny_config, corpus, LR_RANGE, "--sweep.n_trials", "3", "--sweep.seed", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    cache = cache_files()
    again = sweep(tiny_config, corpus, LR_RANGE, "--sweep.n_trials", "2", "--sweep.seed", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert cache_files() == cache  # the tokenizer and token cache were built once, by the first trial

    client = MlflowClient(mlflow_store)
    (parent,), children = runs_by_role(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "tiny"
    assert len(children) == 5 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["trial"] for c in children) == ["0", "1", "2", "3", "4"]
    assert all(c.info.status == "FINISHED" for c in children)

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{Path.cwd() / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    for trial in study.trials:  # the sampled values are the child run's params, under their dotted keys
        (child,) = [c for c in children if c.data.tags["trial"] == str(trial.number)]
        assert float(child.data.params["model.learning_rate"]) == pytest.approx(trial.params["model.learning_rate"])
        assert int(child.data.params["model.n_layer"]) == trial.params["model.n_layer"]
        history = [m.value for m in client.get_metric_history(child.info.run_id, "val/bpb")]
        assert trial.value == pytest.approx(min(history))
        assert trial.user_attrs["overhead_s"] > 0
        name = re.fullmatch(r"tiny-(\d+)-lr([0-9.e-]+)-layers(\d+)", child.info.run_name)  # what it sampled
        assert name and int(name[1]) == trial.number and int(name[3]) == trial.params["model.n_layer"], child.info.run_name
        assert float(name[2]) == pytest.approx(trial.params["model.learning_rate"], rel=0.05)

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")
    }
    expected = {"best.yaml", "base.yaml", "trials.csv", "plots/optimization_history.png",
                "plots/param_importances.png", "plots/parallel_coordinate.png", "plots/optuna.html"}
    assert expected <= artifacts
    html = Path(client.download_artifacts(parent.info.run_id, "plots/optuna.html", str(Path.cwd()))).read_text()
    assert html.count("Plotly.newPlot") == 3  # interactive
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js inlined: the page needs no network
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["best/val_bpb"] == pytest.approx(study.best_value)
    assert parent.data.metrics["best.model.learning_rate"] == pytest.approx(study.best_params["model.learning_rate"])
    assert parent.data.params["space.model.learning_rate"] == "{high: 0.02, log: true, low: 0.001}"
    assert parent.data.params["sweep.metric"] == "val/bpb" and parent.data.params["sweep.direction"] == "minimize"

    best_yaml = Path(client.download_artifacts(parent.info.run_id, "best.yaml", str(Path.cwd())))
    assert yaml.safe_load(best_yaml.read_text())["model"]["learning_rate"] == study.best_params["model.learning_rate"]
    fit = run_cli("fit", "--config", str(best_yaml), "--trainer.logger.init_args.experiment_name", "best")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("best").experiment_id])
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val/bpb")]
    assert min(history) == pytest.approx(study.best_value, rel=1e-4)


def test_a_trial_far_behind_is_pruned_and_a_failing_trial_is_recorded(mlflow_store, tiny_config, corpus):
    # Seed 6 draws (1e-2, 2 heads), (1e-7, 2 heads), then (1e-7, 3 heads): n_embd 32 does not split into 3 heads.
    space = {"model.learning_rate": {"choices": [1e-2, 1e-7]}, "model.n_head": {"choices": [2, 3]}}
    done = sweep(tiny_config, corpus, space, "--sweep.n_trials", "3", "--sweep.seed", "6", "--sweep.startup_trials", "1")
    assert done.returncode == 0, done.stderr[-3000:]

    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{Path.cwd() / 'optuna.db'}").trials
    assert [(t.params["model.learning_rate"], t.params["model.n_head"]) for t in trials] == [(1e-2, 2), (1e-7, 2), (1e-7, 3)]
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[1].user_attrs["pruned_at_step"] == 10  # at the first validation, of two
    assert "n_head" in trials[2].user_attrs["error"] and "trial 2: failed (exit code 2)" in done.stdout

    client = MlflowClient(mlflow_store)
    (parent,), children = runs_by_role(client)
    assert parent.info.status == "FINISHED"
    pruned, failed = (next(c for c in children if c.data.tags["trial"] == n) for n in ("1", "2"))
    assert pruned.info.status == "KILLED" and pruned.data.tags["pruned"] == "true"
    assert len(client.get_metric_history(pruned.info.run_id, "val/bpb")) == 1
    assert failed.info.status == "FAILED" and "n_head" in failed.data.tags["error"]
    assert failed.data.params["model.n_head"] == "3"  # a trial that failed before its run began gets one


def test_a_sweep_whose_every_trial_failed_exits_non_zero_with_a_summary(mlflow_store, tiny_config, corpus):
    # n_embd 32 does not split into 3 heads: every trial fails as it starts.
    done = sweep(tiny_config, corpus, {"model.n_head": {"choices": [3]}}, "--sweep.n_trials", "2")
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: all 2 trials of this sweep failed (trial 0:") and "n_head" in last, last
    (parent,), children = runs_by_role(MlflowClient(mlflow_store))
    assert len(children) == 2 and all(c.info.status == "FAILED" for c in children)


@pytest.mark.parametrize("n_trials", ["0", "-1"])
def test_fewer_than_one_trial_is_one_line(n_trials, mlflow_store, tiny_config, corpus, capsys):
    code = run_main("sweep", "--config", str(tiny_config), "--data.path", str(corpus), "--sweep.n_trials", n_trials,
                    "--sweep.space", json.dumps(LR_RANGE))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: sweep.n_trials={n_trials} must be at least 1 (the trials to run now)"], err
    assert not Path("optuna.db").exists()


def test_a_negative_timeout_is_one_line(mlflow_store, tiny_config, corpus, capsys):
    code = run_main("sweep", "--config", str(tiny_config), "--data.path", str(corpus), "--sweep.timeout", "-1",
                    "--sweep.space", json.dumps(LR_RANGE))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sweep.timeout=-1.0 must be >= 0 seconds" in err[0], err
    assert not Path("optuna.db").exists()


BAD_SPACES = {
    "unknown-key": ({"model.learnin_rate": {"low": 1e-4, "high": 1e-2}}, "model.learnin_rate is not a config key"),
    "low-above-high": ({"model.learning_rate": {"low": 1e-2, "high": 1e-4}}, "low 0.01 > high 0.0001"),
    "empty-choices": ({"data.vocab_size": {"choices": []}}, "choices is empty"),
    "not-a-number": ({"model.nonfinite_loss": {"low": 1, "high": 2}}, "'stop', not a number"),
    "unset-and-not-a-number": ({"data.tokenizer_path": {"low": 1, "high": 2}}, "data.tokenizer_path is not a number"),
    "float-bounds-on-an-int": ({"model.n_layer": {"low": 1.5, "high": 4}}, "model.n_layer is an integer"),
    "no-distribution": ({"model.n_layer": [1, 2]}, 'give {"low"'),
    "empty": ({}, "sweep.space is empty"),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=list(BAD_SPACES))
def test_a_bad_space_is_one_line_before_any_trial(case, mlflow_store, tiny_config, corpus, capsys):
    space, message = BAD_SPACES[case]
    code = run_main("sweep", "--config", str(tiny_config), "--data.path", str(corpus), "--sweep.space", json.dumps(space))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert runs_by_role(MlflowClient(mlflow_store)) == ([], [])
    assert not Path("optuna.db").exists()


def test_speedrun_sweep_config_is_valid_and_a_dead_sweeps_trial_is_failed(mlflow_store, corpus, capsys):
    args = ["sweep", "--config", str(ROOT / "conf" / "speedrun-shakespeare.yaml"), "--config", str(ROOT / "conf" / "sweep-speedrun.yaml"),
            "--data.path", str(corpus), "--sweep.timeout", "0"]  # checks and records the study, runs no trial
    assert run_main(*args) == 0, capsys.readouterr().err
    assert "no trial started: sweep.timeout=0.0 s had passed" in capsys.readouterr().out
    storage = f"sqlite:///{Path.cwd() / 'optuna.db'}"
    study = optuna.load_study(study_name="sweep-speedrun", storage=storage)
    assert study.user_attrs["sweep"]["target"] == 2.72 and "data.vocab_size" in study.user_attrs["sweep"]["space"]

    orphan = study.ask()  # as a sweep killed with -9 leaves its trial in flight
    orphan.set_user_attr("sweep_pid", 2**22 + 1)  # above Linux's pid_max: no such process
    orphan.set_user_attr("sweep_host", socket.gethostname())
    assert run_main(*args) == 0
    assert study.trials[0].state.name == "FAIL" and study.trials[0].user_attrs["error"] == "its sweep process died"
    (parent,), _ = runs_by_role(MlflowClient(mlflow_store), "speedrun-shakespeare")
    assert parent.info.run_name == "sweep-speedrun" and parent.info.status == "FINISHED"
