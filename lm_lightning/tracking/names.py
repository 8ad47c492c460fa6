"""What a run is called and tagged with in MLflow, decided from its config before anything is seeded."""

from __future__ import annotations

import secrets
from pathlib import Path

from jsonargparse import Namespace


# Short labels of the keys a sweep samples most, for trial names; any other key is named by its last part.
SHORT_KEYS = {
    "learning_rate": "lr", "vocab_size": "vocab", "batch_size": "batch", "max_steps": "steps", "warmup_steps": "warmup",
    "min_lr_ratio": "min_lr", "n_layer": "layers", "n_embd": "width", "n_head": "heads", "weight_decay": "wd",
}


def stamp() -> str:
    """A random suffix (from the OS, not Python's seeded ``random``) for runs that would otherwise share a name:
    ``a3f1``. The time a run started is its own column in the MLflow UI."""
    return secrets.token_hex(2)


def short_number(value: float) -> str:
    """``3.2e-3``, ``0.25``, ``16``: few characters, two significant digits for a float."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.2g}"
    return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")


def trial_name(study: str, number: int, params: dict) -> str:
    """A sweep trial's run name: the study, the trial's number and what it sampled, ``speedrun-3-lr3.2e-3-batch16``."""
    values = [f"{SHORT_KEYS.get(key.rsplit('.', 1)[-1], key.rsplit('.', 1)[-1])}{short_number(v)}" for key, v in params.items()]
    return "-".join([study, str(number), *values])


def _config_stem(config: Namespace) -> str:
    files = config.get("config") or []
    return Path(str(files[-1])).stem if files else "run"


def run_name(config: Namespace, subcommand: str) -> str:
    """A readable name that tells runs apart: ``default-4x192-lr2e-3-a3f1`` (config file, depth x width, learning
    rate, a random suffix for runs of one config), ``validate-`` etc. prefixed for the commands that score a
    checkpoint. Short, so that the runs table shows it whole.

    MLflow's own names (``zealous-wolf-546``) come from Python's ``random``, which ``seed_everything`` has seeded
    by the time the run starts: every run would get the same one. The suffix comes from the OS instead.
    """
    model = config.model
    shape = f"{model.n_layer}x{model.n_embd}"
    lr = f"lr{model.learning_rate:.0e}".replace("e-0", "e-").replace("e+0", "e")
    parts = [_config_stem(config), shape] + ([lr] if subcommand == "fit" else [])
    parts.append(stamp())
    name = "-".join(parts)
    return name if subcommand == "fit" else f"{subcommand}-{name}"


def name_run(config: Namespace, subcommand: str, tags: dict[str, str] | None = None) -> None:
    """Give the configured MLflow logger a run name (unless one is set, or the run is continued) and the tags
    ``command`` (fit, validate, test) and ``tags``."""
    logger = config.trainer.logger
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init_args is None or "run_name" not in init_args:
        return
    if init_args.run_name is None and init_args.get("run_id") is None:
        init_args.run_name = run_name(config, subcommand)
    init_args.tags = {**(init_args.tags or {}), "command": subcommand, **(tags or {})}
