"""``lm-lightning generate``: the real command in a subprocess, and its errors through ``main``."""

import argparse

import pytest
import torch

from lm_lightning.cli import main
from lm_lightning.generate import TextGenerator

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "我爱北京天安门"


def expected_output(checkpoint, prompt: str, **kwargs) -> str:
    texts = TextGenerator.load(checkpoint).generate(prompt, **kwargs)
    n = len(texts)
    return "".join((f"--- sample {i + 1} of {n} ---\n" if n > 1 else "") + prompt + t + "\n" for i, t in enumerate(texts))


def test_generate_prints_the_samples_of_the_python_api(tiny_run):
    result = run_cli(
        "generate", "--ckpt_path", str(tiny_run["checkpoint"]), "--prompt", PROMPT,
        "--max_new_tokens", "20", "--num_samples", "3", "--seed", "1", "--device", "cpu",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == expected_output(tiny_run["checkpoint"], PROMPT, max_new_tokens=20, num_samples=3, seed=1)


def test_stream_a_prompt_from_stdin_with_a_stop_string(tiny_run):
    kwargs = dict(max_new_tokens=30, num_samples=2, seed=2, temperature=1.0)
    full = TextGenerator.load(tiny_run["checkpoint"]).generate(PROMPT, **kwargs)[0]
    stop = full[6:8]
    result = run_cli(
        "generate", "--ckpt_path", str(tiny_run["checkpoint"]), "--prompt_file", "-", "--stream",
        "--max_new_tokens", "30", "--num_samples", "2", "--seed", "2", "--temperature", "1.0", "--stop+", stop,
        input=PROMPT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == expected_output(tiny_run["checkpoint"], PROMPT, stop=[stop], **kwargs)
    assert result.stdout.startswith(f"--- sample 1 of 2 ---\n{PROMPT}{full[: full.index(stop)]}\n")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--help"])
    assert exit.value.code == 0
    help = capsys.readouterr().out
    for flag in ("--ckpt_path", "--prompt", "--prompt_file", "--max_new_tokens", "--num_samples", "--temperature",
                 "--top_k", "--top_p", "--seed", "--stop", "--stream", "--device"):
        assert flag in help
    assert "0 is greedy decoding" in help


def test_a_long_prompt_warns_on_stderr(tiny_run, capsys):
    main(["generate", "--ckpt_path", str(tiny_run["checkpoint"]), "--prompt", "word " * 50, "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert err.startswith("warning: the prompt has ") and "tokens; only its last 32 (block_size) are read" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top_p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--top_p", "1.01"], "top_p=1.01 must be in (0, 1]"),
        (["--temperature", "-1"], "temperature=-1.0 must be >= 0 (0 is greedy decoding)"),
        (["--num_samples", "0"], "num_samples=0 must be at least 1"),
        (["--prompt", "x", "--prompt_file", "p.txt"], "pass --prompt or --prompt_file, not both"),
        (["--prompt_file", "missing.txt"], "prompt file missing.txt does not exist"),
    ],
)
def test_bad_settings_get_a_one_line_error(tiny_run, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--ckpt_path", str(tiny_run["checkpoint"]), *args])
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def write_checkpoint(path, kind: str) -> None:
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif kind == "unsafe":  # unpickling it would import and build an arbitrary class
        torch.save({"state_dict": {}, "payload": argparse.Namespace(run="rm -rf /")}, path)


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "does not exist"), ("corrupt", "is truncated or not a checkpoint"), ("unsafe", "refused for safety")],
)
def test_missing_corrupt_or_unsafe_checkpoint_gets_a_one_line_error(tmp_path, capsys, kind, message):
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, kind)
    for command in ("generate", "export"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--ckpt_path", str(path), *(["--out", str(tmp_path / "out")] if command == "export" else [])])
        assert exit.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
