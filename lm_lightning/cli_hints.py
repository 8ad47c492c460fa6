"""Hints for a mistyped command line: every flag of a parser, "did you mean" for unknown flags and subcommands.

A leaf module, so the entry point and the subcommands' parsers can all use it without importing each other.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterator


def option_strings(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every ``--flag`` of ``parser`` and of its subcommands' parsers."""
    for action in parser._actions:
        yield from (s for s in action.option_strings if s.startswith("--"))
        if isinstance(getattr(action, "choices", None), dict):
            for sub in action.choices.values():
                if isinstance(sub, argparse.ArgumentParser):
                    yield from option_strings(sub)


def did_you_mean(message: str, options: list[str]) -> str:
    """``message`` with "did you mean --x?" for each unknown ``--flag`` it names that is close to one of ``options``."""
    hints = []
    known = set(options)
    for flag in dict.fromkeys(re.findall(r"--[\w.-]+", message)):
        if flag not in known and (close := difflib.get_close_matches(flag, options, n=1, cutoff=0.75)):
            hints.append(f"did you mean {close[0]}?")
    return "; ".join([message, *hints])


def unknown_subcommand(name: str, commands: list[str]) -> str:
    close = difflib.get_close_matches(name, commands, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "`lm-lightning --help` lists them"
    return f"unknown subcommand {name!r}: {hint} (subcommands: {', '.join(commands)})"
