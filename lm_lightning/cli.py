"""The ``lm-lightning`` command: ``fit``, ``validate`` and ``test`` go to LightningCLI (``trainer_cli.py``); the light
subcommands (``evaluate``, ``generate``, ``export``, ``serve``) run without Lightning's trainer stack, and the top-level help
is written here, so that none of them waits for Lightning, MLflow or transformers to import.

A ``UserError`` (or an argument error) is shown as one line, ``error: ...``, exit code 2; a run that could not
go on (``RunError``, ``WriteError``) as one line, exit code 1; anything else is a crash with its traceback.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from jsonargparse import ArgumentError, set_parsing_settings

from lm_lightning.cli_hints import did_you_mean, option_strings, unknown_subcommand  # noqa: F401  re-exported for callers of lm_lightning.cli
from lm_lightning.errors import RunError, UserError
from lm_lightning.files import WriteError

SIGTERM_EXIT_CODE = 128 + 15  # the shell's code for a process ended by SIGTERM: job schedulers see it did not finish

TRAINER_COMMANDS = {
    "fit": "Train a model (--config conf/default.yaml); continue a stopped run with --ckpt_path last.",
    "validate": "Score a checkpoint (--ckpt_path) on the validation split of data.path.",
    "test": "Score a checkpoint (--ckpt_path) on the test split of data.path (data.test_fraction).",
}
LIGHT_COMMANDS = {  # lm_lightning/commands.py
    "evaluate": "Score a checkpoint on text files, every token once: loss, perplexity, bits per byte.",
    "generate": "Continue a prompt with a trained model.",
    "export": "Write a checkpoint as a Hugging Face transformers folder.",
    "chat": "Talk to a chat model (a checkpoint or folder with a chat template).",
    "serve": "Serve a model over an OpenAI-compatible HTTP API, with a chat page.",
}
# Subcommands in modules of their own, each with ``main(args)``; listed when the module is there.
OTHER_COMMANDS = {
    "sweep": ("lm_lightning.sweep.run", "An Optuna study over any fit config key; every trial a child run in MLflow."),
}
# Optional packages torchmetrics imports whenever they are installed (transformers for BERTScore, scipy for audio
# metrics, matplotlib for plots): ~3 s of every start of fit, for metrics we never use.
UNUSED_BY_TORCHMETRICS = ("transformers", "scipy", "matplotlib")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _other_commands() -> dict[str, tuple[str, str]]:
    return {name: (module, text) for name, (module, text) in OTHER_COMMANDS.items() if importlib.util.find_spec(module)}


def print_help() -> None:
    """The top-level help (LightningCLI's would import the whole trainer stack to print a list of subcommands)."""
    commands = {**TRAINER_COMMANDS, **LIGHT_COMMANDS, **{k: v[1] for k, v in _other_commands().items()}}
    width = max(map(len, commands))
    print("usage: lm-lightning {" + ",".join(commands) + "} ...\n")
    print("Train GPT-style language models on your own text; compare runs in MLflow.\n\nsubcommands:")
    for name, text in commands.items():
        print(f"  {name:<{width}}  {text}")
    print("\n`lm-lightning <subcommand> --help` lists every option of a subcommand.")


@contextmanager
def _without_unused_torchmetrics_backends() -> Iterator[None]:
    """While Lightning (and through it torchmetrics) is imported, ``UNUSED_BY_TORCHMETRICS`` read as not installed
    to lightning_utilities' checks, which torchmetrics asks before importing them; imported later, they work."""
    from importlib.metadata import PackageNotFoundError

    from lightning_utilities.core import imports

    saved = imports._version, imports.module_available, imports.package_available

    def version(name: str) -> str:
        if name in UNUSED_BY_TORCHMETRICS:
            raise PackageNotFoundError(name)
        return saved[0](name)

    imports._version = version
    imports.module_available = lambda name: name.split(".")[0] not in UNUSED_BY_TORCHMETRICS and saved[1](name)
    imports.package_available = lambda name: name not in UNUSED_BY_TORCHMETRICS and saved[2](name)
    try:
        yield
    finally:
        imports._version, imports.module_available, imports.package_available = saved


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")  # Lightning's advert for its logging service


def _run_trainer_cli(args: list[str] | None, subcommand: str | None) -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    # MLflow shows a progress bar for every artifact it reads (log_table reads the table it appends to).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "torchmetrics" not in sys.modules:
        with _without_unused_torchmetrics_backends():
            import torchmetrics  # noqa: F401
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lm_lightning.trainer_cli import run_trainer_cli

    try:
        run_trainer_cli(args, subcommand)
    except SIGTERMException:
        print("stopped by SIGTERM or Ctrl-C: continue with the same command and --ckpt_path last", file=sys.stderr)
        sys.exit(SIGTERM_EXIT_CODE)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lm-lightning``."""
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, on every step it logs.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A field's docstring (GPTConfig, Sampling) is its --help text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        sys.exit(0 if argv else 2)
    try:
        if argv[0] in LIGHT_COMMANDS:
            from lm_lightning import commands

            commands.run(argv[0], argv[1:])
        elif argv[0] in (other := _other_commands()):
            importlib.import_module(other[argv[0]][0]).main(argv[1:])
        elif argv[0] in TRAINER_COMMANDS:
            _run_trainer_cli(args, argv[0])
        elif argv[0].startswith("-"):  # options before the subcommand (--config, --print_config): LightningCLI's
            _run_trainer_cli(args, None)
        else:
            raise UserError(unknown_subcommand(argv[0], [*TRAINER_COMMANDS, *LIGHT_COMMANDS, *other]))
    except (ArgumentError, UserError, RunError, WriteError) as e:
        if os.environ.get("LM_LIGHTNING_DEBUG"):
            raise
        hint = " (--help lists every key)" if isinstance(e, ArgumentError) else ""
        print(f"error: {_one_line(e)}{hint}", file=sys.stderr)
        sys.exit(1 if isinstance(e, (RunError, WriteError)) else 2)


if __name__ == "__main__":
    main()
