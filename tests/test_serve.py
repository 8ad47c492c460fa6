"""``lm-lightning serve``: a real server subprocess on 127.0.0.1 talked to with the real ``openai`` client, raw HTTP
for what a client library would not send, and the chat page in headless Chromium; the batching engine in process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from conftest import CHINESE, english_text
from lm_lightning.chat_template import load_chat_template
from lm_lightning.errors import UserError
from lm_lightning.export import export_pretrained
from lm_lightning.generate import Sampling, TextGenerator
from lm_lightning.model import GPT, GPTConfig, KVCache
from lm_lightning.serving.engine import Engine, Event, Request, in_passing_thread
from lm_lightning.tokenizer import train_tokenizer

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
CHROMIUM = Path("/usr/bin/chromium")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A random Llama-shaped model with a 512-token context (long answers, so a stream outlives its client), a
    tokenizer trained here and a ChatML chat template, written by ``export_pretrained``."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer([english_text(20_000) + "\n" + CHINESE * 10], 300)
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=512, n_layer=2, n_head=2, n_embd=32, bias=False,
                       pos_embedding="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=64)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(30)  # far from uniform: greedy text that varies with the prompt
    folder = export_pretrained(model.eval(), tokenizer, tmp_path_factory.mktemp("served") / "tiny-llama")
    tokenizer_config = folder / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "chat_template": CHATML}))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, *args: str, **variables: str) -> tuple[subprocess.Popen, str]:
    """``lm-lightning serve`` of ``folder`` on a free port (with the environment ``variables``), once ``/health``
    answers: the process and its base URL."""
    port = free_port()
    env = {**os.environ, **variables, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "lm_lightning.cli", "serve", "--ckpt_path", str(folder), "--port",
                                str(port), "--device", "cpu", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {process.stdout.read()}")
        try:
            requests.get(f"{url}/health", timeout=1)
            return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start in 60 s")


@pytest.fixture(scope="module")
def server(model_folder):
    process, url = start_server(model_folder, "--api_key", KEY, "--limits.max_tokens", "400", "--limits.max_n", "16",
                                "--limits.max_body_bytes", "60000")
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(30)


@pytest.fixture
def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(folder: Path, prompt: str, max_tokens: int) -> str:
    return TextGenerator.load(folder).complete(prompt, Sampling(max_new_tokens=max_tokens, temperature=0))[0]


@pytest.mark.parametrize("shape", [dict(), dict(pos_embedding="rope", sliding_window=4, sliding_window_layers=[0])])
def test_kv_cache_rows_at_their_own_positions_give_each_row_its_own_logits(shape):
    """Rows of different lengths joined into one cache (learned positions; RoPE with a sliding window) decode as
    each sequence read whole, without a cache."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, **shape)).eval()
    sequences = [torch.randint(50, (n,)) for n in (3, 9, 6)]
    with torch.no_grad():
        caches = []
        for ids in sequences:
            caches.append(KVCache(model.config, 1, 10 + len(ids), "cpu", torch.float32))
            model(ids[None, :-1], caches[-1])
        cache = caches[0]
        cache.select(torch.zeros(1, dtype=torch.long))
        for other in caches[1:]:
            cache.join(other)
        for step in range(5):
            logits = model(torch.stack([ids[-1] for ids in sequences])[:, None], cache)[:, -1]
            for row, ids in enumerate(sequences):
                torch.testing.assert_close(logits[row], model(ids[None])[0, -1], atol=1e-5, rtol=1e-4)
            sequences = [torch.cat([ids, logits[row].argmax()[None]]) for row, ids in enumerate(sequences)]


def test_engine_rows_that_join_mid_generation_decode_as_alone(model_folder):
    """Each request joins the batch while the first is generating, each at its own position: every answer is the
    one ``generate`` gives for that prompt alone."""
    generator = TextGenerator.load(model_folder)
    prompts = ["The ", "我爱北京天安门", "Once upon a time, there was a", "q"]
    sampling = Sampling(max_new_tokens=30, temperature=0)
    want = [generator.complete(p, sampling)[0] for p in prompts]
    engine = Engine(generator)
    texts, joined_at, finished = [""] * len(prompts), [], threading.Event()

    def emit(i: int):
        def on(event: Event) -> None:
            texts[i] += event.text
            if i + 1 < len(prompts) and event.tokens == 3 * (i + 1) and not event.finish_reason:
                joined_at.append(len(engine.rows))
                engine.submit(Request(generator.tokenizer.encode(prompts[i + 1]).ids, sampling, emit(i + 1)))
            if event.finish_reason and i == len(prompts) - 1:
                finished.set()
        return on

    engine.start()
    engine.submit(Request(generator.tokenizer.encode(prompts[0]).ids, sampling, emit(0)))
    assert finished.wait(60)
    engine.stop()
    assert joined_at == [1, 2, 3]  # each request joined while the others were decoding
    assert texts == want


def test_the_model_loads_in_a_thread_that_ends(model_folder):
    """serve loads in a thread of its own so that the main thread never owns an OpenMP team: the load's result or its
    error comes back as it is, and the thread is gone afterwards."""
    loaded_in = []

    def load() -> TextGenerator:
        loaded_in.append(threading.current_thread())
        return TextGenerator.load(model_folder)

    def fail() -> None:
        raise UserError("no such folder")

    assert isinstance(in_passing_thread(load), TextGenerator)
    assert loaded_in[0] is not threading.main_thread() and not loaded_in[0].is_alive()
    with pytest.raises(UserError, match="no such folder"):
        in_passing_thread(fail)


def test_models_completions_and_usage(client, model_folder):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    answer = client.completions.create(model="tiny-llama", prompt="The ", max_tokens=20, temperature=0)
    assert answer.choices[0].text == greedy(model_folder, "The ", 20)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.prompt_tokens == len(TextGenerator.load(model_folder).tokenizer.encode("The ").ids)
    assert 0 < answer.usage.completion_tokens <= 20
    text = answer.choices[0].text
    stop = text[6:8]
    stopped = client.completions.create(model="tiny-llama", prompt="The ", max_tokens=20, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    several = client.completions.create(model="tiny-llama", prompt=["The ", "a"], max_tokens=5, n=2, temperature=1, seed=3)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny-llama", prompt=["The ", "a"], max_tokens=5, n=2, temperature=1, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in several.choices]  # the same seed, the same text


def test_streaming_gives_the_same_text_as_a_whole_answer(client):
    whole = client.completions.create(model="tiny-llama", prompt="我爱", max_tokens=40, temperature=0)
    chunks = list(client.completions.create(model="tiny-llama", prompt="我爱", max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "\ufffd" not in whole.choices[0].text  # valid UTF-8 by default


def test_chat_completions_and_stream(client, model_folder):
    messages = [{"role": "user", "content": "Hello"}]
    answer = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    template = load_chat_template(model_folder)
    generator = TextGenerator.load(model_folder)
    assert answer.usage.prompt_tokens == len(template.encode(generator.tokenizer, messages, add_generation_prompt=True))
    rendered = template.render(messages, add_generation_prompt=True)  # the prompt ends "<|im_start|>assistant\n"
    assert rendered.endswith("assistant\n")
    assert answer.choices[0].message.content == generator.complete(rendered, Sampling(max_new_tokens=16, temperature=0))[0]
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "wizard", "content": "x"}], max_tokens=2)


def test_errors_are_openai_shaped_4xx(client, server):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens=401 is more than the limit of 400"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=401)
    with pytest.raises(openai.BadRequestError, match="more than the limit of 16"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=2, n=17)
    with pytest.raises(openai.BadRequestError, match="5000 choices"):  # checked before 5000 prompts are tokenized
        client.completions.create(model="tiny-llama", prompt=["x"] * 5000, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-llama", prompt="word " * 600, max_tokens=2)
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = {
        "{not json": "not valid JSON",
        '{"model": "tiny-llama", "prompt": "x", "max_tokens": "ten"}': "max_tokens",
        '{"model": "tiny-llama", "prompt": 5}': "prompt",
        '{"model": "tiny-llama", "prompt": "x", "temperature": -1}': "temperature",
        "[1, 2]": "not an object",
        '{"model": "tiny-llama", "prompt": "x", "seed": 1e30}': "seed",
        '{"model": "tiny-llama", "prompt": "x", "seed": 100000000000000000000000}': "seed",
        json.dumps({"model": "tiny-llama", "prompt": "x" * 70_000}): "limit of 60000",
    }
    for body, words in cases.items():
        r = requests.post(f"{server}/v1/completions", data=body, headers=headers, timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400, (body[:40], r.text)
        assert words in error["message"] and "\n" not in error["message"] and "Traceback" not in r.text
        assert set(error) == {"message", "type", "param", "code"}


def test_a_request_without_the_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    r = requests.post(f"{server}/v1/completions", json={"model": "tiny-llama", "prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{server}/health", timeout=30).status_code == 200  # health and the page need no key


def test_a_client_that_goes_away_frees_its_place_at_once(server):
    """A stream of 400 tokens x 16 choices dropped after its first chunk, and the same request waited for whole then
    given up on: the engine has nothing in flight well before the answer would have been done."""
    body = {"model": "tiny-llama", "prompt": "The ", "max_tokens": 400, "n": 16, "stream": True, "temperature": 1,
            "valid_utf8": False}
    headers = {"Authorization": f"Bearer {KEY}"}
    start = time.perf_counter()
    whole = requests.post(f"{server}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=60)
    assert whole.status_code == 200
    full_time = time.perf_counter() - start
    with requests.post(f"{server}/v1/completions", json=body, headers=headers, stream=True, timeout=60) as r:
        next(r.iter_lines())
        start = time.perf_counter()
    while requests.get(f"{server}/health", timeout=30).json()["in_flight"]:
        assert time.perf_counter() - start < full_time / 2, "the dropped stream is still generating"
        time.sleep(0.01)
    start = time.perf_counter()
    with pytest.raises(requests.Timeout):  # a whole answer waited for, given up on
        requests.post(f"{server}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=full_time / 8)
    while requests.get(f"{server}/health", timeout=30).json()["in_flight"]:
        assert time.perf_counter() - start < full_time * 0.8, "the dropped request is still generating"
        time.sleep(0.01)


def test_a_port_in_use_is_one_line_before_the_model_loads(model_folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "lm_lightning.cli", "serve", "--ckpt_path", str(model_folder), "--port",
                                 str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and result.stderr.count("\n") == 1


def test_sigterm_drains_requests_in_flight_then_exits_and_the_key_comes_from_the_environment(model_folder):
    process, url = start_server(model_folder, LM_LIGHTNING_API_KEY="key-from-env")
    body = {"model": "tiny-llama", "prompt": "The ", "max_tokens": 300, "stream": True, "temperature": 0}
    assert requests.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
    headers = {"Authorization": "Bearer key-from-env"}
    with requests.post(f"{url}/v1/completions", json=body, headers=headers, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert first.startswith(b"data: ") and rest[-1] == b"data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    # uvicorn re-raises the signal once it has drained (its exit status then says SIGTERM, as a shell expects)
    assert process.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no Chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_chat_page_streams_an_answer_and_resets(server, model_folder):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        offline = []
        page.on("request", lambda request: offline.append(request.url.startswith(server)))
        page.goto(server)
        page.fill("#api_key", KEY)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "20")
        page.uncheck("#chat_mode")  # plain completion: comparable with generate's greedy text
        page.fill("#input", "The ")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done]", timeout=30_000)
        assert page.inner_text(".user") == "The "
        assert page.text_content(".assistant") == greedy(model_folder, "The ", 20)
        page.click("#reset")
        assert page.locator(".msg").count() == 0
        page.check("#chat_mode")  # through the chat template, as /v1/chat/completions answers
        page.fill("#input", "Hello")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done]", timeout=30_000)
        chat = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY).chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=20, temperature=0)
        assert page.text_content(".assistant") == chat.choices[0].message.content
        browser.close()
    assert offline and all(offline)  # nothing but the server was asked for
