"""Tokenization throughput and memory: builds the token cache of a corpus made of the shared
corpora repeated to a target size, and reports MB/s and peak RSS.

    python benchmarks/tokenize_throughput.py --size_mb 50            # the data benchmark
    python benchmarks/tokenize_throughput.py --size_mb 2048          # a corpus larger than RAM would be

Memory must stay flat whatever the size: text is streamed in blocks and tokens go straight to disk.
The tokenizer is trained once beforehand (on the first 20 MB) so only tokenization is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from lm_lightning.data import TextDataModule
from lm_lightning.tokenizer import save_tokenizer, train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_mb()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_mb())


def make_corpus(path: Path, size_mb: int) -> int:
    texts = [p.read_bytes() for p in sorted(SHARED.glob("*.txt"))]
    unit = b"\n".join(texts) + b"\n"
    target = size_mb << 20
    with open(path, "wb") as f:
        written = 0
        while written < target:
            f.write(unit)
            written += len(unit)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=int, default=50)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where the corpus and cache go (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        n_bytes = make_corpus(corpus, args.size_mb)
        sample = corpus.open("rb").read(20 << 20).decode("utf-8", errors="ignore").splitlines(keepends=True)
        save_tokenizer(train_tokenizer(sample, args.vocab_size), tmp / "tokenizer.json")
        del sample
        dm = TextDataModule(path=str(corpus), tokenizer_path=str(tmp / "tokenizer.json"), cache_dir=str(tmp / "cache"))
        monitor = PeakRSS()
        baseline = rss_mb()
        monitor.start()
        start = time.perf_counter()
        dm.prepare_data()
        seconds = time.perf_counter() - start
        monitor.done.set()
        monitor.join()
        meta = json.loads((dm.folder / "meta.json").read_text())
        result = {
            "corpus_mb": round(n_bytes / 2**20, 1),
            "tokens": meta["train_tokens"] + meta["val_tokens"],
            "seconds": round(seconds, 2),
            "mb_per_s": round(n_bytes / 2**20 / seconds, 2),
            "rss_before_mb": round(baseline, 1),
            "peak_rss_mb": round(monitor.peak, 1),
            "cores": os.cpu_count(),
        }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
