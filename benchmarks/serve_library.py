"""The same tiny endpoint (POST a number, get it doubled back) on LitServe and on FastAPI with uvicorn: requests/s
and p50 latency at 16 concurrent clients, each server in a subprocess on 127.0.0.1. The figure that chose the
serving library of ``lm-lightning serve`` (docs/serve.md).

    python benchmarks/serve_library.py --requests 2000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import requests

FASTAPI = """
import uvicorn
from fastapi import FastAPI
app = FastAPI()
@app.post("/predict")
async def predict(body: dict) -> dict:
    return {{"output": body["input"] * 2}}
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
"""

LITSERVE = """
import litserve as ls
class Double(ls.LitAPI):
    def setup(self, device):
        pass
    def decode_request(self, request):
        return request["input"]
    def predict(self, x):
        return x * 2
    def encode_response(self, output):
        return {{"output": output}}
if __name__ == "__main__":  # LitServe starts its workers with spawn, which re-imports this file
    ls.LitServer(Double(), accelerator="cpu", workers_per_device=1).run(port={port}, generate_client_file=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def hammer(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """Requests/s and p50 latency (ms) of ``requests`` POSTs from ``concurrency`` clients at once."""
    latencies: list[float] = []
    todo = iter(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as client:
        async def worker() -> None:
            for i in todo:
                t = time.perf_counter()
                async with client.post(url, json={"input": i}) as r:
                    assert (await r.json())["output"] == 2 * i
                latencies.append(time.perf_counter() - t)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return requests / elapsed, 1000 * latencies[len(latencies) // 2]


def measure(name: str, code: str, count: int, concurrency: int) -> None:
    port = free_port()
    script = Path(tempfile.mkdtemp()) / f"{name}_server.py"
    script.write_text(code.format(port=port))
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/predict"
    try:
        for _ in range(600):
            try:
                requests.post(url, json={"input": 1}, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        asyncio.run(hammer(url, 50, concurrency))  # warm up
        rps, p50 = asyncio.run(hammer(url, count, concurrency))
        print(f"{name:10s} {rps:8.0f} requests/s   p50 {p50:6.1f} ms   ({count} requests, {concurrency} clients)")
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    measure("fastapi", FASTAPI, args.requests, args.concurrency)
    measure("litserve", LITSERVE, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
