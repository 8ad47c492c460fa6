"""What a run is called and tagged with in MLflow, decided from its config before anything is seeded."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from jsonargparse import Namespace


def stamp() -> str:
    """The moment and a random suffix (from the OS, not Python's seeded ``random``): ``1130-051203-a3f1``."""
    return f"{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _config_stem(config: Namespace) -> str:
    files = config.get("config") or []
    return Path(str(files[-1])).stem if files else "run"


def run_name(config: Namespace, subcommand: str) -> str:
    """A readable name that tells runs apart: ``default-4x192-lr2e-3-1130-051203-a3f1`` (config file, depth x
    width, learning rate, start time, a random suffix for runs started in the same second), ``validate-`` etc.
    prefixed for the commands that score a checkpoint.

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
