"""Load on ``lm-lightning serve``: 1, 4, 16 and 32 concurrent streaming clients, then a bounded run of which a tenth of
the requests are malformed. Prints requests/s, generated tokens/s, p50/p95 time to first token and total latency per
level, and the status codes of the bounded run (the goal: no 5xx).

    python benchmarks/serve_load.py --shape default   # the default model shape (GPTConfig()), random weights
    python benchmarks/serve_load.py --shape 124m      # GPT-2 124M shape (12 x 768, 1024 positions)

The model is built here (random weights, a tokenizer trained on the test corpus) and exported to a folder, so
nothing is downloaded. Tokens are counted from each answer's ``usage`` (a request may end early at end-of-text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import CHINESE, english_text  # noqa: E402  the test corpus, to train the tokenizer on
from lm_lightning.export import export_pretrained  # noqa: E402
from lm_lightning.model import GPT, GPTConfig  # noqa: E402
from lm_lightning.tokenizer import train_tokenizer  # noqa: E402

SHAPES = {
    "default": {},
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}
PROMPTS = ["The ", "Once upon a time", "In the beginning", "我爱北京天安门", "A short story about", "Question: what is"]
MALFORMED = [
    b"{not json", b"[1, 2, 3]", b'{"model": "bench", "prompt": "x", "max_tokens": "ten"}',
    b'{"model": "other", "prompt": "x"}', b'{"model": "bench", "prompt": "x", "n": 1000}',
    b'{"model": "bench", "prompt": "x", "max_tokens": 1000000000}', b'{"model": "bench", "prompt": 5}',
    b'{"model": "bench", "prompt": "x", "temperature": "hot"}', b"", b'{"model": "bench", "prompt": "x", "top_p": 0}',
]


def build(shape: str, out: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = train_tokenizer([english_text(200_000) + CHINESE * 50], 1000)
    vocab = 50304 if shape == "124m" else tokenizer.get_vocab_size()  # 124M's embedding; the tokenizer uses its first rows
    model = GPT(GPTConfig(vocab_size=vocab, **SHAPES[shape])).eval()
    return export_pretrained(model, tokenizer, out / "bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(session: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed completion: time to first token, total latency, tokens generated."""
    body = {"model": "bench", "prompt": random.choice(PROMPTS), "max_tokens": max_tokens, "stream": True,
            "temperature": 0.8, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, tokens


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def level(url: str, clients: int, requests_per_client: int, max_tokens: int) -> float:
    results = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client() -> None:
            for _ in range(requests_per_client):
                results.append(await one(session, url, max_tokens))
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ttft, latency, tokens = zip(*results)
    tps = sum(tokens) / elapsed
    print(f"| {clients:>2} | {len(results):>4} | {len(results) / elapsed:6.2f} | {tps:8.0f} | {1000 * pct(ttft, .5):6.0f} | "
          f"{1000 * pct(ttft, .95):6.0f} | {1000 * pct(latency, .5):6.0f} | {1000 * pct(latency, .95):6.0f} |", flush=True)
    return tps


async def bounded(url: str, total: int, clients: int, max_tokens: int) -> dict[int, int]:
    """``total`` requests from ``clients`` at once, every tenth malformed: the count of each status code."""
    codes: dict[int, int] = {}
    todo = iter(range(total))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client() -> None:
            for i in todo:
                if i % 10 == 9:
                    data = MALFORMED[(i // 10) % len(MALFORMED)]
                    async with session.post(f"{url}/v1/completions", data=data) as r:
                        await r.read()
                        status = r.status
                else:
                    body = {"model": "bench", "prompt": random.choice(PROMPTS), "max_tokens": max_tokens, "stream": i % 2 == 0}
                    async with session.post(f"{url}/v1/completions", json=body) as r:
                        await r.read()
                        status = r.status
                codes[status] = codes.get(status, 0) + 1
        await asyncio.gather(*(client() for _ in range(clients)))
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="default")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--requests_per_client", type=int, default=4)
    parser.add_argument("--bounded", type=int, default=500, help="requests of the bounded run (0: skip it)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    folder = build(args.shape, Path(tempfile.mkdtemp()))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lm_lightning.cli", "serve", "--ckpt_path", str(folder), "--port", str(port),
                               "--model_name", "bench", "--device", args.device], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                requests.get(f"{url}/health", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        asyncio.run(level(url, 2, 1, 8))  # warm up
        print(f"\nshape {args.shape}, {args.max_tokens} tokens per request, device {args.device}\n")
        print("| clients | requests | requests/s | tokens/s | TTFT p50 ms | TTFT p95 ms | latency p50 ms | latency p95 ms |")
        print("|---|---|---|---|---|---|---|---|")
        tps = {c: asyncio.run(level(url, c, max(args.requests_per_client, 1) if c < 16 else 2, args.max_tokens))
               for c in (1, 4, 16, 32)}
        print(f"\n16 clients / 1 client tokens/s: {tps[16] / tps[1]:.1f}x")
        if args.bounded:
            codes = asyncio.run(bounded(url, args.bounded, 32, 16))
            fives = sum(n for code, n in codes.items() if code >= 500)
            print(f"bounded run: {args.bounded} requests (a tenth malformed), status codes {dict(sorted(codes.items()))}, 5xx: {fives}")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
