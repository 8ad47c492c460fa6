"""``lm-lightning evaluate``, ``generate`` and ``export``: typed functions whose docstrings are the CLI help."""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_type_hints

import torch
from jsonargparse import ArgumentError, ArgumentParser, auto_cli

from lm_lightning.chat_template import ChatTemplate
from lm_lightning.cli_hints import did_you_mean, option_strings
from lm_lightning.errors import UserError
from lm_lightning.evaluate import evaluate_model, log_evaluation
from lm_lightning.export import export_pretrained
from lm_lightning.generate import Sampling, TextGenerator, check_num_samples
from lm_lightning.lora import export_adapter
from lm_lightning.pretrained import SourceInfo, load_source
from lm_lightning.serving.limits import Limits


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _read_prompt(prompt: str, prompt_file: str | None) -> str:
    """The prompt: ``prompt``, or the text of ``prompt_file`` (``-``: standard input) read byte for byte, so CRLF
    and CR stay as they are; a leading byte-order mark (as Windows editors write) is not part of the text."""
    if prompt_file is None:
        return prompt
    if prompt:
        raise UserError("pass --prompt or --prompt_file, not both")
    path = Path(prompt_file)
    if prompt_file == "-":
        data, path = sys.stdin.buffer.read(), "standard input"
    elif path.is_dir():
        raise UserError(f"prompt file {path} is a directory; pass a UTF-8 text file, or - for standard input")
    elif not path.is_file():
        raise UserError(f"prompt file {path} does not exist; pass an existing UTF-8 file, or - for standard input")
    else:
        data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"prompt file {path} is not UTF-8: undecodable byte 0x{data[e.start]:02x} at byte offset {e.start}; "
            "convert it (e.g. iconv -f GB18030 -t UTF-8)"
        ) from None


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
        ckpt_path: A checkpoint (.ckpt) written by ``lm-lightning fit``, a folder written by ``lm-lightning export``,
            or a transformers GPT-2, Llama or Qwen3 folder (config.json, safetensors weights, its tokenizer).
        prompt: Text to continue. Empty: start a new document (from the end-of-text token).
        prompt_file: Read the prompt from this UTF-8 file instead; ``-`` reads standard input.
        num_samples: Samples to generate, in one batch (at most 1024, and as many as the
            device has memory for).
        stream: Print the first sample token by token as it is generated (the others follow when done).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; ``auto`` picks a GPU if there is one.
        sampling: How tokens are drawn (``Sampling``): max_new_tokens (at most 32768), temperature, top_k, top_p,
            seed, stop, valid_utf8.
    """
    settings = Sampling(**sampling)
    check_num_samples(num_samples)
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


@dataclass
class EvalData:
    """The text to score."""

    path: str
    """A UTF-8 text file, a folder (searched recursively for .txt, .md and .jsonl files) or a glob, as ``fit``'s."""


def evaluate(
    ckpt_path: str,
    data: EvalData,
    stride: int | None = None,
    batch_size: int = 8,
    json_output: bool = False,
    mlflow: bool = True,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    device: str = "auto",
) -> None:
    """Score a model on text files, every token once: print loss, perplexity, bits per byte, token and byte counts.

    Windows of the model's block_size run over the documents joined as in training (end-of-text between them). A
    ``.jsonl`` of conversations (``messages``, or ``prompt`` and ``completion``) is rendered with the model's chat
    template and scored as validation scores it: each conversation alone, on the assistant's tokens only.

    Args:
        ckpt_path: A checkpoint (.ckpt) written by ``lm-lightning fit``, a folder written by ``lm-lightning export``, or
            a transformers model folder (GPT-2, Llama or Qwen3: config.json, safetensors weights, tokenizer files).
        data: The text to score.
        stride: Tokens between the starts of consecutive windows. Unset: block_size (windows do not overlap).
            Smaller: windows overlap and each token is scored once, with more context (slower).
        batch_size: Windows per forward pass.
        json_output: Print the scores as one JSON object instead.
        mlflow: Record the evaluation as an MLflow run (tag command=evaluate), named after the text, with the text as
            its dataset input; nested under the checkpoint's run where that run is in the same experiment.
        experiment_name: MLflow experiment for the run. Unset: the checkpoint's run's experiment.
        tracking_uri: Where the run is recorded. Unset: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; ``auto`` picks a GPU if there is one.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, info = load_source(ckpt_path)
    source_run_id = info.run_id if info.kind == "checkpoint" else None
    # A corpus of conversations is rendered with the model's chat template.
    scores = evaluate_model(model.to(device), tokenizer, data.path, stride, batch_size, info.chat_template)
    run_id = None
    if mlflow:
        stride = model.config.block_size if stride is None else stride
        run_id = log_evaluation(scores, ckpt_path, data.path, source_run_id, stride, experiment_name, tracking_uri)
    if json_output:
        print(json.dumps({**asdict(scores), "mlflow_run_id": run_id}))
        return
    print(
        f"loss {scores.loss:.4f}  perplexity {scores.ppl:.2f}  bits per byte {scores.bpb:.4f}  "
        f"({scores.tokens} tokens, {scores.bytes} bytes)"
    )
    if run_id:
        print(f"MLflow run {run_id}")


def _print_header(i: int, num_samples: int) -> None:
    if num_samples > 1:
        print(f"--- sample {i + 1} of {num_samples} ---")


def export(ckpt_path: str, out: str, overwrite: bool = False, adapter: bool = False) -> None:
    """Write a checkpoint as a Hugging Face transformers folder of its family (GPT-2, Llama or Qwen3).

    The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)``, offline.

    Args:
        ckpt_path: A checkpoint (.ckpt) written by ``lm-lightning fit``.
        out: Folder to write (``config.json``, ``model.safetensors``, ``generation_config.json``,
            ``tokenizer.json``, ``tokenizer_config.json``).
        overwrite: Write into ``out`` even if it is not empty (files of the same names are replaced).
        adapter: For a LoRA run's checkpoint: write its adapters as a PEFT folder (``adapter_config.json``,
            ``adapter_model.safetensors``) for ``PeftModel.from_pretrained(base, out)``, not the merged model.
    """
    if adapter:
        print(f"exported the adapters of {ckpt_path} to {export_adapter(ckpt_path, out, overwrite)}")
        return
    model, tokenizer, info = load_source(ckpt_path)  # a LoRA run's checkpoint: merged onto its base
    template = info.chat_template
    folder = export_pretrained(model, tokenizer, out, overwrite, template.source if template else None)
    print(f"exported {ckpt_path} to {folder}")


def answer_pieces(generator: TextGenerator, template: ChatTemplate, messages: list[dict], settings: Sampling) -> Iterator[str]:
    """The assistant's answer to ``messages``, as it is generated (pieces of whole characters with ``valid_utf8``);
    it ends at the template's end-of-turn token. A conversation the model cannot read whole is one line of error."""
    ids = template.encode(generator.tokenizer, messages, add_generation_prompt=True)
    block_size = generator.model.config.block_size
    if len(ids) >= block_size:
        raise UserError(f"the conversation has {len(ids)} tokens, the model reads {block_size}; /reset it or shorten it")
    device = generator.model.lm_head.weight.device
    for step in generator.sample_ids(torch.tensor(ids, dtype=torch.long, device=device), settings):
        yield step[0]


def _answer(generator: TextGenerator, template: ChatTemplate, messages: list[dict], settings: Sampling) -> str:
    """Stream the assistant's answer to ``messages`` to standard output and return it."""
    pieces = []
    for piece in answer_pieces(generator, template, messages, settings):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print(flush=True)
    return "".join(pieces)


def chat(ckpt_path: str, prompt: str = "", system: str = "", device: str = "auto", **sampling) -> None:
    """Talk to a chat model: multi-turn in a terminal, or one turn from --prompt or piped standard input.

    In a terminal each line is a user turn (``/reset`` starts over, ``/exit`` or end of input quits); with
    ``--prompt``, or standard input that is not a terminal, one turn is answered and the answer printed alone.

    Args:
        ckpt_path: A checkpoint (.ckpt) with a chat template, an export of one, or a transformers folder with a
            chat template (tokenizer_config.json ``chat_template`` or chat_template.jinja).
        prompt: One user turn; the answer is printed alone and the command ends.
        system: A system turn before the conversation.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; ``auto`` picks a GPU if there is one.
        sampling: How tokens are drawn (``Sampling``): max_new_tokens, temperature, top_k, top_p, seed, stop,
            valid_utf8. An answer ends at the template's end-of-turn token.
    """
    settings = Sampling(**sampling)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, info = load_source(ckpt_path, require_chat_template=True)
    template = info.chat_template
    generator = TextGenerator(model.to(device), tokenizer, (*info.stop_tokens, *template.stop_token_ids(tokenizer)))
    start = [{"role": "system", "content": system}] if system else []
    if prompt or not sys.stdin.isatty():
        text = prompt or sys.stdin.read()
        _answer(generator, template, [*start, {"role": "user", "content": text}], settings)
        return
    messages = list(start)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": _answer(generator, template, messages, settings)})


API_KEY_VARIABLE = "LM_LIGHTNING_API_KEY"


def serve(
    ckpt_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    limits: Limits = Limits(),
    max_batch: int = 64,
    device: str = "auto",
) -> None:
    """Serve a model over OpenAI's HTTP API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, streaming
    as server-sent events), with ``/health`` and a chat page at ``/``. Requests in flight decode together, in one
    batch; SIGTERM (or Ctrl-C) stops taking new ones, finishes those in flight and exits.

    Args:
        ckpt_path: A checkpoint (.ckpt) written by ``lm-lightning fit``, a folder written by ``lm-lightning export``,
            or a transformers GPT-2, Llama or Qwen3 folder (config.json, safetensors weights, its tokenizer).
        host: Address to listen on. The default answers this machine only; ``0.0.0.0`` answers every network
            (then set an ``--api_key``).
        port: TCP port.
        api_key: Every ``/v1/`` request must send ``Authorization: Bearer <api_key>`` (else 401). Unset:
            ``$LM_LIGHTNING_API_KEY``; neither: no key asked.
        model_name: The model's id in the API (``model`` of a request). Unset: the checkpoint's file or folder name.
        limits: What one request may ask for; past a limit the answer is a 400.
        max_batch: The most choices decoded at once (requests past it wait their turn).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; ``auto`` picks a GPU if there is one.
    """
    import uvicorn

    from lm_lightning.serving.app import Server, create_app
    from lm_lightning.serving.engine import Engine, in_passing_thread

    if not 1 <= port <= 65535:
        raise UserError(f"port={port} must be in 1 to 65535")
    if max_batch < 1:
        raise UserError(f"max_batch={max_batch} must be at least 1")
    try:  # before the model loads: a port in use is one line, not uvicorn's log after seconds of loading
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
    api_key = api_key or os.environ.get(API_KEY_VARIABLE) or None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    def load() -> tuple[TextGenerator, SourceInfo]:
        model, tokenizer, info = load_source(ckpt_path)
        return TextGenerator(model.to(device), tokenizer, info.stop_tokens), info

    generator, info = in_passing_thread(load)  # this thread computes nothing: the engine's thread has the cores
    name = model_name or Path(ckpt_path).resolve().name
    server = Server(Engine(generator, max_batch), name, limits, api_key, info.chat_template)
    print(f"serving {name} on http://{host}:{port} (chat page at /, API at /v1)", file=sys.stderr, flush=True)
    # uvicorn answers SIGTERM by closing the socket and waiting for the requests in flight; then the app's lifespan
    # drains the engine.
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=None)


COMMANDS = {"evaluate": evaluate, "generate": generate, "export": export, "chat": chat, "serve": serve}


def run(name: str, args: list[str]) -> None:
    """Parse ``args`` into the arguments of the command ``name`` and run it."""
    function = COMMANDS[name]
    warnings.showwarning = _warn
    # jsonargparse wants a value for every bool ("--stream true"); let a flag stand alone too.
    flags = {f"--{arg}" for arg, hint in get_type_hints(function).items() if hint is bool}
    # --json for json_output: a parameter may not be called json, which names the module.
    args = ["--json_output" if arg == "--json" else arg for arg in args]
    given = []
    for i, arg in enumerate(args):
        given.append(arg)
        if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("--")):
            given.append("true")
    try:
        auto_cli(function, args=given, as_positional=False, prog=f"lm-lightning {name}", allow_abbrev=False, exit_on_error=False)
    except ArgumentError as e:
        parser = ArgumentParser()
        parser.add_function_arguments(function, as_positional=False)
        raise ArgumentError(None, did_you_mean(str(e), sorted(option_strings(parser)))) from None
