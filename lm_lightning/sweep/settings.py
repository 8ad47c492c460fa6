"""What ``lm-lightning sweep`` is asked to do: its ``--sweep.*`` settings, and the fit arguments every trial shares."""

from __future__ import annotations

import inspect
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lm_lightning.errors import UserError

CONFIG_FLAGS = ("--config", "-c")


class SweepError(UserError):
    """A sweep that cannot start as asked: shown as one ``error: ...`` line, exit code 2."""


@dataclass
class SweepSettings:
    """An Optuna study over any ``lm-lightning fit`` config key; every trial is a child run in MLflow.

    Every other flag (``--config``, ``--model.*``, ``--trainer.*``, ...) is passed to each trial's ``fit``.
    These settings are flags (``--sweep.n_trials 20``) or a ``sweep:`` section of a ``--config`` file.

    Args:
        space: Dotted config key -> distribution: ``{"low": 1e-4, "high": 1e-2, "log": true}`` (a float range;
            an int range when both bounds are ints; optional ``step``), or ``{"choices": [512, 2048]}``.
        metric: Metric each trial logs at every validation; the trial's value is its best one.
        direction: ``minimize`` or ``maximize`` the metric.
        target: When set, the objective is the seconds of training until ``metric`` first reaches ``target`` (a
            trial stops there); a trial that never reaches it is recorded as pruned, so it ranks below every
            trial that does.
        n_trials: Trials to run now; rerunning the same command runs this many more in the same study.
        timeout: Start no new trial after this many seconds (the trial in flight finishes); 0 checks and records the
            study and runs no trial. Unset: no limit.
        name: Study name (and the parent MLflow run's name). Unset: the name of the config file with the
            ``sweep:`` section, else of the last config file.
        pruner: ``median``: stop a trial whose metric is worse than the median of earlier trials at the same
            step; ``none``: run every trial to its end.
        startup_trials: The median pruner prunes nothing until this many trials are complete.
        warmup_steps: The median pruner prunes no trial before this training step.
        storage: Optuna storage URL. Unset: ``optuna.db`` beside the MLflow sqlite database (else in the
            working directory).
        seed: Seed of the sampler (TPE), for a reproducible sequence of trials. Unset: random.
    """

    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "val/bpb"
    direction: Literal["minimize", "maximize"] = "minimize"
    target: float | None = None
    n_trials: int = 10
    timeout: float | None = None
    name: str | None = None
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = 5
    warmup_steps: int = 0
    storage: str | None = None
    seed: int | None = None


@dataclass
class SweepArgs:
    """A parsed command line: the settings, and what goes to each trial's ``fit``."""

    settings: SweepSettings
    fit_args: list[str]
    """Fit flags, with config files that had a ``sweep:`` section replaced by copies without it."""
    workdir: tempfile.TemporaryDirectory
    """Holds those copies while the sweep runs."""


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``--sweep.*`` flags (``--sweep.x v`` or ``--sweep.x=v``) and ``--help``, apart from everything else."""
    sweep, fit = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            sweep.append(arg)
        elif arg.startswith("--sweep.") or arg.startswith("--sweep="):
            sweep.append(arg)
            if "=" not in arg and i + 1 < len(args):
                sweep.append(args[i + 1])
                i += 1
        else:
            fit.append(arg)
        i += 1
    return sweep, fit


def strip_sweep_sections(fit_args: list[str], workdir: Path) -> tuple[list[str], list[tuple[Path, dict]]]:
    """Replaces each ``--config`` file that has a ``sweep:`` section (which ``fit`` would refuse) by a copy
    without it in ``workdir``; returns the new arguments and the sections, with the file each came from."""
    out, sections = [], []
    i = 0
    while i < len(fit_args):
        flag, eq, path = fit_args[i].partition("=")
        if flag not in CONFIG_FLAGS:
            out.append(fit_args[i])
        else:
            if not eq and i + 1 < len(fit_args):
                i += 1
                path = fit_args[i]
            out += ["--config", _without_sweep(Path(path), workdir, len(sections), sections)]
        i += 1
    return out, sections


def _without_sweep(path: Path, workdir: Path, index: int, sections: list[tuple[Path, dict]]) -> str:
    if not path.is_file():
        return str(path)  # fit says what is wrong with it
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or "sweep" not in config:
        return str(path)
    section = config.pop("sweep")
    if not isinstance(section, dict):
        raise SweepError(f"{path}: its sweep: section must be a mapping of sweep settings")
    sections.append((path, section))
    copy = workdir / f"{index}-{path.name}"
    copy.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(copy)


def parse_sweep_args(args: list[str]) -> SweepArgs:
    """Parses ``lm-lightning sweep`` arguments; ``--help`` prints the settings' documentation and exits."""
    from jsonargparse import ArgumentParser

    sweep_flags, fit_args = split_args(args)
    workdir = tempfile.TemporaryDirectory(prefix="lm-lightning-sweep-")
    fit_args, sections = strip_sweep_sections(fit_args, Path(workdir.name))
    parser = ArgumentParser(prog="lm-lightning sweep", exit_on_error=False, description=inspect.cleandoc(SweepSettings.__doc__).split("\n\nArgs:")[0])
    parser.add_class_arguments(SweepSettings, "sweep")
    from_files = [f"--sweep.{key}={json.dumps(value)}" for _, section in sections for key, value in section.items()]
    settings = SweepSettings(**parser.parse_args([*from_files, *sweep_flags]).sweep.as_dict())
    if settings.name is None:
        named = sections[-1][0] if sections else _last_config(fit_args)
        settings.name = named.stem if named else "sweep"
    return SweepArgs(settings, fit_args, workdir)


def _last_config(fit_args: list[str]) -> Path | None:
    configs = [fit_args[i + 1] for i, arg in enumerate(fit_args[:-1]) if arg == "--config"]
    return Path(configs[-1]) if configs else None
