"""Requests that cannot be honoured, refused in one line before anything big is allocated: ``generate`` (samples,
tokens, memory, prompt files), ``evaluate`` (an empty text, ``--stride 0``) and the served MLflow model over HTTP
(MLflow's own scoring server on 127.0.0.1: too many prompts, too many tokens -> 400)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from unittest import mock

import mlflow
import pytest
import torch

from lm_lightning.export import export_pretrained
from lm_lightning.generate import (
    MAX_NEW_TOKENS_LIMIT,
    MAX_NUM_SAMPLES,
    MAX_REQUEST_NEW_TOKENS,
    MAX_REQUEST_PROMPTS,
    Sampling,
    SamplingError,
    TextGenerator,
)
from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import train_tokenizer
from lm_lightning.tracking.pyfunc import PACKAGE, SERVING, SIGNATURE

from conftest import CHINESE, english_text, run_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An exported random GPT-2 with a byte-level tokenizer of English and Chinese."""
    tokenizer = train_tokenizer([english_text(20_000), CHINESE * 10], vocab_size=400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    return export_pretrained(model, tokenizer, tmp_path_factory.mktemp("model") / "gpt")


def one_line_error(capsys, *args) -> str:
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_sampling_limits():
    with pytest.raises(SamplingError, match=f"max_new_tokens=1000000000 is more than the limit of {MAX_NEW_TOKENS_LIMIT}"):
        Sampling(max_new_tokens=10**9)
    Sampling(max_new_tokens=MAX_NEW_TOKENS_LIMIT)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_samples", "1000000"], f"num_samples=1000000 is more than the limit of {MAX_NUM_SAMPLES} samples at once"),
        (["--max_new_tokens", "1000000000"], f"is more than the limit of {MAX_NEW_TOKENS_LIMIT} tokens per sample"),
        (["--num_samples", "0"], "num_samples=0 must be at least 1"),
    ],
)
def test_generate_refuses_unbounded_requests_in_one_line_at_once(folder, capsys, flags, message):
    start = time.perf_counter()
    assert message in one_line_error(capsys, "generate", "--ckpt_path", str(folder), "--prompt", "a", *flags)
    assert time.perf_counter() - start < 30  # refused, not worked on


def test_samples_that_do_not_fit_in_memory_are_refused_before_the_cache_is_allocated(folder):
    generator = TextGenerator.load(folder)
    with mock.patch("lm_lightning.generate._free_bytes", return_value=2**20):
        with pytest.raises(SamplingError, match=r"num_samples=1024 of \d+ tokens need .* GiB for the KV cache, more than"):
            generator.generate("a", num_samples=MAX_NUM_SAMPLES, max_new_tokens=4000)
    assert len(generator.generate("a", num_samples=2, max_new_tokens=3)) == 2


def test_prompt_files_that_are_not_text_are_one_line(folder, tmp_path, capsys):
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("我爱北京".encode("gb18030"))
    err = one_line_error(capsys, "generate", "--ckpt_path", str(folder), "--prompt_file", str(bad))
    assert "is not UTF-8: undecodable byte 0xce at byte offset 0" in err
    err = one_line_error(capsys, "generate", "--ckpt_path", str(folder), "--prompt_file", str(tmp_path))
    assert f"prompt file {tmp_path} is a directory" in err
    good = tmp_path / "crlf.txt"
    good.write_bytes("line\r\n我".encode())
    assert run_main("generate", "--ckpt_path", str(folder), "--prompt_file", str(good), "--max_new_tokens", "2", "--device", "cpu") == 0
    assert capsys.readouterr().out.startswith("line\r\n我")  # byte for byte
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfline")  # what Notepad writes
    assert run_main("generate", "--ckpt_path", str(folder), "--prompt_file", str(bom), "--max_new_tokens", "2", "--device", "cpu") == 0
    assert capsys.readouterr().out.startswith("line")


def test_evaluate_refuses_an_empty_text_and_stride_zero(folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    err = one_line_error(capsys, "evaluate", "--ckpt_path", str(folder), "--data.path", str(empty), "--mlflow", "false")
    assert "holds no text (0 bytes): there is nothing to score" in err
    text = tmp_path / "text.txt"
    text.write_text("some text to score " * 10, encoding="utf-8")
    err = one_line_error(capsys, "evaluate", "--ckpt_path", str(folder), "--data.path", str(text), "--stride", "0", "--mlflow", "false")
    assert "stride=0 must be between 1 and the model's block_size (32)" in err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def scoring_server(folder, tmp_path_factory):
    """The model as ``log_text_model`` saves it, served by MLflow's scoring server (the app ``mlflow models serve``
    runs) with uvicorn on 127.0.0.1; yields its /invocations URL."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    path = tmp_path_factory.mktemp("pyfunc") / "model"
    warnings.filterwarnings("ignore", ".*An input example was not provided")  # the signature says what to send
    mlflow.pyfunc.save_model(path, python_model=str(SERVING), artifacts={"pretrained": str(folder)}, code_paths=[str(PACKAGE)],
                             signature=SIGNATURE, pip_requirements=[])
    app = scoring_server.init(mlflow.pyfunc.load_model(str(path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/invocations"
    server.should_exit = True
    thread.join(10)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_served_model_answers_unbounded_requests_with_400(scoring_server):
    start = time.perf_counter()
    status, answer = post(scoring_server, {"inputs": ["a"] * 5000, "params": {"max_new_tokens": 2}})
    assert status == 400 and f"holds 5000 prompts, more than the limit of {MAX_REQUEST_PROMPTS}" in answer["message"]
    status, answer = post(scoring_server, {"inputs": ["a"], "params": {"max_new_tokens": 10**9}})
    assert status == 400 and f"more than the limit of {MAX_NEW_TOKENS_LIMIT}" in answer["message"]
    status, answer = post(scoring_server, {"inputs": ["a"] * 100, "params": {"max_new_tokens": 1000}})
    assert status == 400 and f"ask for 100000 tokens, more than the limit of {MAX_REQUEST_NEW_TOKENS}" in answer["message"]
    # MLflow's server puts its own "Failed to predict data '...'" line before the model's message; no traceback.
    assert answer["message"].endswith("; send fewer prompts or a smaller max_new_tokens") and "stack_trace" not in answer
    assert time.perf_counter() - start < 30


def test_served_answers_are_valid_utf8_and_the_guard_is_a_request_parameter(scoring_server):
    body = {"inputs": ["我爱北京天安门"] * 4, "params": {"max_new_tokens": 30, "seed": 1, "temperature": 1.0}}
    status, answer = post(scoring_server, body)
    assert status == 200 and len(answer["predictions"]) == 4
    assert not any("\ufffd" in text for text in answer["predictions"])
    status, unguarded = post(scoring_server, {**body, "params": {**body["params"], "valid_utf8": False}})
    assert status == 200 and unguarded["predictions"] != answer["predictions"]
