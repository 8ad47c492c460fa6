"""The ``lm-lightning`` command: the light subcommands (``generate``, ``export``) run without Lightning's
trainer stack; ``fit``, ``validate`` and ``test`` go to LightningCLI (``trainer_cli.py``).

A ``UserError`` (or an argument error) is shown as one line, ``error: ...``, exit code 2; a run that could not
go on (``RunError``, ``WriteError``) as one line, exit code 1; anything else is a crash with its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

from jsonargparse import ArgumentError, set_parsing_settings

from lm_lightning.errors import RunError, UserError
from lm_lightning.files import WriteError

SIGTERM_EXIT_CODE = 128 + 15  # the shell's code for a process ended by SIGTERM: job schedulers see it did not finish


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lm-lightning``."""
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, on every step it logs.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A field's docstring (GPTConfig, Sampling) is its --help text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    argv = sys.argv[1:] if args is None else args
    try:
        from lm_lightning import commands

        if argv and argv[0] in commands.COMMANDS:
            commands.run(argv[0], argv[1:])
            return
        if argv and argv[0] == "sweep":  # an Optuna study whose trials are fit processes
            from lm_lightning.sweep.run import main as sweep

            sweep(argv[1:])
            return
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from lm_lightning.trainer_cli import run_trainer_cli

        try:
            run_trainer_cli(args)
        except SIGTERMException:
            print("stopped by SIGTERM or Ctrl-C: continue with the same command and --ckpt_path last", file=sys.stderr)
            sys.exit(SIGTERM_EXIT_CODE)
    except (ArgumentError, UserError, RunError, WriteError) as e:
        if os.environ.get("LM_LIGHTNING_DEBUG"):
            raise
        hint = " (--help lists every key)" if isinstance(e, ArgumentError) else ""
        print(f"error: {_one_line(e)}{hint}", file=sys.stderr)
        sys.exit(1 if isinstance(e, (RunError, WriteError)) else 2)


if __name__ == "__main__":
    main()
