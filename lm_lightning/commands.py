"""``lm-lightning generate`` and ``lm-lightning export``: typed functions whose docstrings are the CLI help."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import get_type_hints

import torch
from jsonargparse import auto_cli

from lm_lightning.checkpoint import load_gpt
from lm_lightning.export import export_pretrained
from lm_lightning.errors import UserError
from lm_lightning.generate import Sampling, SamplingError, TextGenerator


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _read_prompt(prompt: str, prompt_file: str | None) -> str:
    if prompt_file is None:
        return prompt
    if prompt:
        raise UserError("pass --prompt or --prompt_file, not both")
    if prompt_file == "-":
        return sys.stdin.read()
    path = Path(prompt_file)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; pass an existing UTF-8 file, or - for standard input")
    with open(path, encoding="utf-8", newline="") as f:  # byte for byte: CRLF and CR stay as they are
        return f.read()


def generate(
    ckpt_path: str,
    prompt: str = "",
    prompt_file: str | None = None,
    num_samples: int = 1,
    stream: bool = False,
    device: str = "auto",
    **sampling,
) -> None:
    """Continue a prompt with a trained model and print each sample (the prompt, then its continuation).

    Args:
        ckpt_path: A checkpoint (.ckpt) written by ``lm-lightning fit``, or a folder written by ``lm-lightning export``.
        prompt: Text to continue. Empty: start a new document (from the end-of-text token).
        prompt_file: Read the prompt from this UTF-8 file instead; ``-`` reads standard input.
        num_samples: Samples to generate, in one batch.
        stream: Print the first sample token by token as it is generated (the others follow when done).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; ``auto`` picks a GPU if there is one.
        sampling: How tokens are drawn (``Sampling``): max_new_tokens, temperature, top_k, top_p, seed, stop.
    """
    settings = Sampling(**sampling)
    if num_samples < 1:
        raise SamplingError(f"num_samples={num_samples} must be at least 1")
    text = _read_prompt(prompt, prompt_file)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = TextGenerator.load(ckpt_path, device)
    steps = generator.sample(text, settings, num_samples)
    done = []
    if stream:
        _print_header(0, num_samples)
        print(text, end="", flush=True)
        for pieces in steps:
            print(pieces[0], end="", flush=True)
            done.append(pieces)
        print()
    texts = ["".join(p) for p in zip(*(done or steps))]
    for i in range(1 if stream else 0, num_samples):
        _print_header(i, num_samples)
        print(text + texts[i])


def _print_header(i: int, num_samples: int) -> None:
    if num_samples > 1:
        print(f"--- sample {i + 1} of {num_samples} ---")


def export(ckpt_path: str, out: str, overwrite: bool = False) -> None:
    """Write a checkpoint as a Hugging Face transformers GPT-2 folder.

    The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)``, offline.

    Args:
        ckpt_path: A checkpoint (.ckpt) written by ``lm-lightning fit``.
        out: Folder to write (``config.json``, ``model.safetensors``, ``generation_config.json``,
            ``tokenizer.json``, ``tokenizer_config.json``).
        overwrite: Write into ``out`` even if it is not empty (files of the same names are replaced).
    """
    model, tokenizer = load_gpt(ckpt_path)
    folder = export_pretrained(model, tokenizer, out, overwrite)
    print(f"exported {ckpt_path} to {folder}")


COMMANDS = {"generate": generate, "export": export}


def run(name: str, args: list[str]) -> None:
    """Parse ``args`` into the arguments of the command ``name`` and run it."""
    function = COMMANDS[name]
    warnings.showwarning = _warn
    # jsonargparse wants a value for every bool ("--stream true"); let a flag stand alone too.
    flags = {f"--{arg}" for arg, hint in get_type_hints(function).items() if hint is bool}
    given = []
    for i, arg in enumerate(args):
        given.append(arg)
        if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("--")):
            given.append("true")
    auto_cli(function, args=given, as_positional=False, prog=f"lm-lightning {name}")
