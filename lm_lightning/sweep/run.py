"""``lm-lightning sweep``: the study, its parent MLflow run, and one ``lm-lightning fit`` process per trial."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from lm_lightning.files import cache_root
from lm_lightning.tracking.names import trial_name
from lm_lightning.tracking.ui import prepare_experiment, runs_table_address
from lm_lightning.tracking.store import mlflow_client, resolve_tracking_uri, sqlite_database, store_init_lock
from lm_lightning.sweep.report import PRUNED_AT, RUN_ID, SECONDS_TO_TARGET, make_pruner
from lm_lightning.sweep.settings import SweepError, SweepSettings, parse_sweep_args
from lm_lightning.sweep.space import build_space, check_keys, lookup

INTERRUPTED_EXIT_CODE = 130
TOKENIZER_KEYS = ("data.vocab_size", "data.tokenizer_sample_bytes", "data.jsonl_field")
"""Keys that change the tokenizer a trial trains, hence its token cache."""
PARENT_TAG = "sweep"
"""Tag of the parent MLflow run: the study name. Rerunning a sweep finds its parent run by it."""


def flag_value(value: Any) -> str:
    """``value`` as a command-line value the fit parser reads back unchanged (``1e-07`` alone would be a string in YAML)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).split("\n...")[0].strip()


def as_flags(values: dict[str, Any]) -> list[str]:
    """``{"model.n_layer": 4}`` -> ``["--model.n_layer", "4"]``."""
    return [part for key, value in values.items() for part in (f"--{key}", flag_value(value))]


def resolve_config(fit_args: list[str], overrides: dict[str, Any] | None = None) -> str:
    """The resolved ``fit`` config (``--print_config``) as YAML, parsed in this process by ``lm-lightning`` itself;
    a bad flag or config exits here, with fit's one-line error."""
    from lm_lightning.cli import main

    out, argv = io.StringIO(), sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when sys.argv holds other arguments than those it is given
    try:
        with contextlib.redirect_stdout(out):
            main(["fit", *fit_args, *as_flags(overrides or {}), "--print_config"])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = argv
    return out.getvalue()


def is_our_logger(class_path: str) -> bool:
    """Whether a config's ``trainer.logger.class_path`` is ``MLflowLogger`` (or a subclass), under any module path."""
    from lm_lightning.tracking.logger import MLflowLogger

    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, MLflowLogger)


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [] if before == after else [prefix.rstrip(".") or "(config)"]
    keys = sorted(before.keys() | after.keys())
    return [k for key in keys for k in changed_keys(before.get(key), after.get(key), f"{prefix}{key}.")]


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` beside an sqlite MLflow database, else in the working directory."""
    database = sqlite_database(tracking_uri)
    return f"sqlite:///{database.with_name('optuna.db')}" if database else "sqlite:///optuna.db"


def _die_with_parent() -> None:
    # A trial whose sweep is killed (kill -9) gets SIGTERM and ends as a stopped run, instead of training on alone.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_line(path: Path) -> str:
    """The last non-empty line of a trial's output: its one-line error, or a traceback's last line."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class Sweep:
    """One invocation of ``lm-lightning sweep``: checks, then runs ``n_trials`` trials, then sums up."""

    def __init__(self, settings: SweepSettings, fit_args: list[str]):
        self.settings = settings
        if settings.n_trials < 1:
            raise SweepError(f"sweep.n_trials={settings.n_trials} must be at least 1 (the trials to run now)")
        if settings.timeout is not None and settings.timeout < 0:
            raise SweepError(f"sweep.timeout={settings.timeout} must be >= 0 seconds (0: record the study, run no trial), or unset for no limit")
        self.space = build_space(settings.space)
        if settings.target is not None and settings.direction == "maximize":
            raise SweepError("sweep.target: the objective is then seconds to the target, for a metric that is minimized")
        self.base_yaml = resolve_config(fit_args)
        self.base = yaml.safe_load(self.base_yaml)
        check_keys(self.space, self.base, lambda overrides: yaml.safe_load(resolve_config(fit_args, overrides)))
        logger = lookup(self.base, "trainer.logger") or {}
        if not (isinstance(logger, dict) and is_our_logger(logger.get("class_path", ""))):
            raise SweepError("a sweep records its trials in MLflow: trainer.logger must be lm_lightning's MLflowLogger")
        self.logger_args = logger.get("init_args") or {}
        self.tracking_uri = resolve_tracking_uri(self.logger_args.get("tracking_uri"))
        self.storage = settings.storage or default_storage(self.tracking_uri)
        self.client = mlflow_client(self.tracking_uri)
        self.study = self._study()
        self.experiment_id, self.parent_id, self.folder = self._parent_run()

    def _study(self) -> optuna.Study:
        s = self.settings
        with store_init_lock(self.storage):
            study = optuna.create_study(
                storage=self.storage,
                study_name=s.name,
                direction="minimize" if s.target is not None else s.direction,
                sampler=optuna.samplers.TPESampler(seed=s.seed),
                pruner=make_pruner(s.pruner, s.startup_trials, s.warmup_steps),
                load_if_exists=True,
            )
        self._check_same_base(study)
        self._fail_orphans(study)
        return study

    def _check_same_base(self, study: optuna.Study) -> None:
        """A study's trials compare only if they share their base config: refuse to continue with another."""
        before = study.user_attrs.get("base_config")
        if before is None:
            study.set_user_attr("base_config", self.base)
            study.set_user_attr("sweep", {k: v for k, v in vars(self.settings).items() if k != "seed"})
            return
        if changed := changed_keys(before, self.base):
            raise SweepError(
                f"study {study.study_name!r} ran with another config ({', '.join(changed[:5])} differ): "
                "rerun it as it was, or start a new study with --sweep.name"
            )

    def _fail_orphans(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a sweep that died (kill -9) are failed: never counted as good."""
        host = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = trial.user_attrs.get("sweep_pid")
            if trial.user_attrs.get("sweep_host") == host and not (isinstance(pid, int) and _alive(pid)):
                study._storage.set_trial_user_attr(trial._trial_id, "error", "its sweep process died")
                study.tell(trial.number, state=TrialState.FAIL)
                print(f"trial {trial.number}: left running by a sweep that died, marked failed")

    def _parent_run(self) -> tuple[str, str, Path]:
        """The experiment, the study's parent MLflow run (created the first time, set back to RUNNING after) and its folder."""
        name = self.logger_args.get("experiment_name") or "lm_lightning"
        with store_init_lock(self.tracking_uri):
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        prepare_experiment(self.client, experiment_id)
        runs = self.client.search_runs([experiment_id], f"tags.{PARENT_TAG} = '{self.settings.name}'", max_results=1)
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {PARENT_TAG: self.settings.name, "optuna.storage": self.storage, "sweep.metric": self.settings.metric}
            run_id = self.client.create_run(experiment_id, run_name=self.settings.name, tags=tags).info.run_id
            self.client.log_batch(run_id, params=self._parent_params())
            self.client.log_dict(run_id, self.settings.space, "space.json")
            self.client.log_text(run_id, self.base_yaml, "base.yaml")
        folder = Path(lookup(self.base, "trainer.default_root_dir") or ".") / experiment_id / run_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "base.yaml").write_text(self.base_yaml, encoding="utf-8")
        return experiment_id, run_id, folder

    def _parent_params(self) -> list:
        """The parent run's params, as its first invocation set them: each key's search space (``space.model.
        learning_rate`` = ``{low: 0.001, high: 0.01, log: true}``) and what the study optimises (``sweep.metric``...)."""
        from mlflow.entities import Param

        s = self.settings
        settings = {"metric": s.metric, "direction": s.direction, "target": s.target, "pruner": s.pruner, "seed": s.seed}
        return [Param(f"space.{key}", flag_value(spec)) for key, spec in s.space.items()] + [
            Param(f"sweep.{key}", flag_value(value)) for key, value in settings.items() if value is not None
        ]

    def run(self) -> None:
        """Runs the trials, then logs the summary to the parent run; Ctrl-C or SIGTERM stop the trial in flight."""
        print(f"sweep {self.settings.name!r}: study in {self.storage}, parent MLflow run {self.parent_id}, trials under {self.folder}")
        status, start = "FAILED", time.monotonic()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        ran: list[int] = []
        try:
            for _ in range(self.settings.n_trials):
                if self.settings.timeout is not None and time.monotonic() - start > self.settings.timeout:
                    break
                trial = self.study.ask(self.space)
                ran.append(trial.number)
                self._run_trial(trial)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._summarize()
            self.client.set_terminated(self.parent_id, status)
        if status == "KILLED":
            print("sweep stopped: rerun the same command to continue the study", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_CODE)
        if not ran:
            print(f"no trial started: sweep.timeout={self.settings.timeout} s had passed; the study and its MLflow run are recorded")
        failed = [t for t in self.study.get_trials(deepcopy=False) if t.number in ran and t.state == TrialState.FAIL]
        if ran and len(failed) == len(ran):
            print(f"error: all {len(ran)} trials of this sweep failed (trial {failed[0].number}: "
                  f"{failed[0].user_attrs.get('error', 'see its log')}); their logs are under {self.folder}", file=sys.stderr)
            sys.exit(1)

    def _trial_command(self, trial: optuna.Trial) -> list[str]:
        s = self.settings
        tags = {**(self.logger_args.get("tags") or {}), "mlflow.parentRunId": self.parent_id, "trial": str(trial.number)}
        report = {
            "class_path": "lm_lightning.sweep.report.ReportToStudy",
            "init_args": {
                "storage": self.storage, "study_name": s.name, "trial_number": trial.number, "metric": s.metric,
                "pruner": s.pruner, "startup_trials": s.startup_trials, "warmup_steps": s.warmup_steps, "target": s.target,
            },
        }
        return [
            sys.executable, "-m", "lm_lightning.cli", "fit", "--config", str(self.folder / "base.yaml"),
            *as_flags(trial.params),
            "--trainer.logger.init_args.run_name", trial_name(s.name, trial.number, trial.params),
            "--trainer.logger.init_args.tags", json.dumps(tags),
            "--trainer.default_root_dir", str(self.folder),
            f"--trainer.callbacks+={json.dumps(report)}",
            *self._cache_flags(trial.params),
        ]

    def _cache_flags(self, params: dict[str, Any]) -> list[str]:
        """A token cache folder per tokenizer the space samples. The data module keeps one cache per corpus and
        rebuilds it whenever the tokenizer changes: trials alternating between vocabulary sizes would each
        retrain the tokenizer and retokenize the corpus."""
        tokenizer = {key: value for key, value in params.items() if key in TOKENIZER_KEYS}
        if not tokenizer:
            return []
        root = Path(lookup(self.base, "data.cache_dir") or cache_root()).expanduser()
        key = hashlib.sha256(json.dumps(tokenizer, sort_keys=True).encode()).hexdigest()[:12]
        return ["--data.cache_dir", str(root / f"sweep-tokenizer-{key}")]

    def _run_trial(self, trial: optuna.Trial) -> None:
        """Runs one trial's ``fit`` to its end and tells the study how it went."""
        trial.set_user_attr("sweep_pid", os.getpid())
        trial.set_user_attr("sweep_host", socket.gethostname())
        values = ", ".join(f"{k}={flag_value(v)}" for k, v in trial.params.items())
        print(f"trial {trial.number}: {values}", flush=True)
        log = self.folder / f"trial-{trial.number}.log"
        started = time.time()
        with open(log, "w", encoding="utf-8") as out:
            child = subprocess.Popen(self._trial_command(trial), stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            try:
                code = child.wait()
            except KeyboardInterrupt:
                self._stop(child)
                trial.set_user_attr("error", "the sweep was interrupted")
                self.study.tell(trial, state=TrialState.FAIL)
                print(f"trial {trial.number}: interrupted, marked failed", flush=True)
                raise
        self._record_overhead(trial, started)
        state, value, note = self._outcome(trial, code, log)
        self.study.tell(trial, value, state=state)
        print(f"trial {trial.number}: {note} ({time.time() - started:.1f} s, output in {log})", flush=True)
        if state == TrialState.FAIL and code == 0:  # every later trial would fail the same way
            raise SweepError(f"trial {trial.number} never logged {self.settings.metric}: check sweep.metric (e.g. val/bpb, val/loss)")

    @staticmethod
    def _stop(child: subprocess.Popen) -> None:
        child.send_signal(signal.SIGTERM)  # the trial saves last.ckpt and ends its run KILLED
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def _finished(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        return self.study._storage.get_trial(trial._trial_id)  # what the trial's process wrote, read fresh

    def _outcome(self, trial: optuna.Trial, code: int, log: Path) -> tuple[TrialState, float | None, str]:
        """How the trial went, from what its process wrote to the study (and its exit code)."""
        frozen, metric = self._finished(trial), self.settings.metric
        if PRUNED_AT in frozen.user_attrs:
            if run_id := frozen.user_attrs.get(RUN_ID):
                self.client.set_terminated(run_id, "KILLED")
            return TrialState.PRUNED, None, f"pruned at step {frozen.user_attrs[PRUNED_AT]}"
        if code != 0:
            error = last_line(log)
            trial.set_user_attr("error", error)
            if RUN_ID not in frozen.user_attrs:
                self._failed_run(trial, error)
            return TrialState.FAIL, None, f"failed (exit code {code}): {error}"
        reported = [v for v in frozen.intermediate_values.values() if v == v]  # NaN never compares equal
        if not reported:
            trial.set_user_attr("error", f"{metric} was never logged")
            return TrialState.FAIL, None, f"failed: {metric} was never logged (check sweep.metric)"
        if self.settings.target is not None:
            seconds = frozen.user_attrs.get(SECONDS_TO_TARGET)
            if seconds is None:
                return TrialState.PRUNED, None, f"never reached {metric} {self.settings.target} (best {min(reported):.4f})"
            return TrialState.COMPLETE, seconds, f"{metric} reached {self.settings.target} in {seconds:.1f} s of training"
        best = max(reported) if self.settings.direction == "maximize" else min(reported)
        return TrialState.COMPLETE, best, f"{metric} {best:.4f}"

    def _failed_run(self, trial: optuna.Trial, error: str) -> None:
        """A FAILED child run for a trial that failed before its own run began (say, a model shape that does not
        fit), so that every trial shows in MLflow with its values and error."""
        tags = {"mlflow.parentRunId": self.parent_id, "trial": str(trial.number), "error": error[:5000]}
        run_id = self.client.create_run(self.experiment_id, run_name=trial_name(self.settings.name, trial.number, trial.params), tags=tags).info.run_id
        for key, value in trial.params.items():
            self.client.log_param(run_id, key, flag_value(value))
        self.client.set_terminated(run_id, "FAILED")

    def _record_overhead(self, trial: optuna.Trial, started: float) -> None:
        """Seconds from the trial's process start to its first training step (imports, data, model, MLflow)."""
        run_id = self._finished(trial).user_attrs.get(RUN_ID)
        if run_id is None:
            return
        train_start = self.client.get_run(run_id).data.tags.get("train_start_ms")
        if train_start is not None:
            overhead = int(train_start) / 1000 - started
            trial.set_user_attr("overhead_s", round(overhead, 2))
            self.client.log_metric(self.parent_id, "trial_overhead_s", overhead, step=trial.number)

    def _summarize(self) -> None:
        """Logs the best trial so far to the parent run: value, params, ``best.yaml``, plots and a trials table."""
        study = self.study
        trials = study.get_trials(deepcopy=False)
        if not trials:
            return
        self.client.log_text(self.parent_id, study.trials_dataframe().to_csv(index=False), "trials.csv")
        if not any(t.state == TrialState.COMPLETE for t in trials):
            return
        best = study.best_trial
        self.client.log_metric(self.parent_id, "best_value", best.value, step=len(trials))
        if self.settings.target is None:  # the objective is the metric: the column the trials' best scores are in
            self.client.log_metric(self.parent_id, f"best/{self.settings.metric.replace('/', '_')}", best.value, step=len(trials))
        self.client.log_metric(self.parent_id, "best_trial", best.number, step=len(trials))
        self.client.set_tag(self.parent_id, "best_trial", str(best.number))
        for key, value in best.params.items():  # numbers as metrics (they change as the study goes on), all as tags
            self.client.set_tag(self.parent_id, f"best.{key}", flag_value(value))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(self.parent_id, f"best.{key}", value, step=len(trials))
        best_yaml = self._best_yaml(best)
        (self.folder / "best.yaml").write_text(best_yaml, encoding="utf-8")
        self.client.log_text(self.parent_id, best_yaml, "best.yaml")
        self._log_plots()
        objective = f"seconds to {self.settings.metric} {self.settings.target}" if self.settings.target else self.settings.metric
        print(f"best: trial {best.number}, {objective} {best.value:.4f}, {flag_value(best.params)}")
        print(f"train it: lm-lightning fit --config {self.folder / 'best.yaml'}")
        print(f"compare the trials: {runs_table_address(self.tracking_uri, self.experiment_id)} (mlflow ui)")

    def _best_yaml(self, best: optuna.trial.FrozenTrial) -> str:
        """The base config with the best trial's values: ``lm-lightning fit --config best.yaml`` trains it."""
        config = yaml.safe_load(self.base_yaml)
        for key, value in best.params.items():
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
        header = f"# sweep {self.settings.name!r}, trial {best.number}: {self.settings.metric} objective {best.value}\n"
        return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)

    def _log_plots(self) -> None:
        """Optuna's optimisation history, parameter importances and parallel coordinates: each a PNG artifact (shown
        inline by the MLflow UI), and all of them in ``plots/optuna.html``, interactive (plotly, its JavaScript
        inlined: the page needs no network)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization as interactive
        from optuna.visualization import matplotlib as plots

        pages = []
        for name in ("optimization_history", "param_importances", "parallel_coordinate"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
                try:
                    axes = getattr(plots, f"plot_{name}")(self.study)
                    pages.append(getattr(interactive, f"plot_{name}")(self.study))
                except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of fewer than 2 trials
                    print(f"no {name} plot yet: {e}")
                    continue
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            figure.set_size_inches(9, 6)
            figure.tight_layout()
            self.client.log_figure(self.parent_id, figure, f"plots/{name}.png")
            plt.close(figure)
        if pages:
            html = [page.to_html(full_html=False, include_plotlyjs=i == 0) for i, page in enumerate(pages)]
            title = f"<title>sweep {self.settings.name}</title>"
            self.client.log_text(self.parent_id, f"<html><head><meta charset='utf-8'>{title}</head><body>{''.join(html)}</body></html>", "plots/optuna.html")


def main(args: list[str]) -> None:
    """``lm-lightning sweep [--sweep.* settings] [fit flags]``: see ``lm-lightning sweep --help``."""
    parsed = parse_sweep_args(args)
    with parsed.workdir:
        Sweep(parsed.settings, parsed.fit_args).run()
