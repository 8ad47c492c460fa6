"""Data pipeline throughput and memory: builds the token cache of a corpus made of the shared
corpora repeated to a target size, then reads training batches from it and trains on it.

    python benchmarks/tokenize_throughput.py --size_mb 50            # the data benchmark
    python benchmarks/tokenize_throughput.py --size_mb 2048          # a cache over 1 GB: memory stays flat

Reports tokenization MB/s and peak RSS while tokenizing, the DataLoader's batches/s (block 128,
batch 32) against the steps/s training consumes, and peak RSS while training a small model on the
cache. RSS is given in all and as its anonymous part (the process's own memory): pages of the
memory-mapped cache count in RSS too, but they are page cache the kernel drops when it needs room. Memory must not grow with the corpus: text is streamed in blocks, tokens go straight to disk,
and training reads windows from a memory map. The tokenizer is trained once beforehand (on the
first 20 MB), so only tokenization is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import lightning as L

from lm_lightning.data import TextDataModule
from lm_lightning.module import LanguageModel
from lm_lightning.tokenizer import save_tokenizer, train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MB: ``VmRSS`` in all, or ``RssAnon``, the process's own memory. The rest is
    file pages mapped from the token cache, which the kernel reclaims under pressure."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.peak_anon = rss_mb(), rss_mb("RssAnon")
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_mb())
            self.peak_anon = max(self.peak_anon, rss_mb("RssAnon"))


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
    parser.add_argument("--train_steps", type=int, default=100, help="steps of a small model trained on the cache")
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
        data = TextDataModule(path=str(corpus), tokenizer_path=str(tmp / "tokenizer.json"), cache_dir=str(tmp / "cache"),
                              block_size=128, batch_size=32)
        data.setup("fit")
        loader = iter(data.train_dataloader())
        start = time.perf_counter()
        n_batches = sum(1 for _, _ in zip(range(500), loader))
        loader_rate = n_batches / (time.perf_counter() - start)

        model = LanguageModel(block_size=128, n_layer=2, n_head=4, n_embd=128)
        trainer = L.Trainer(max_steps=args.train_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
        train_monitor = PeakRSS()
        train_monitor.start()
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        steps_rate = args.train_steps / (time.perf_counter() - start)
        train_monitor.done.set()
        train_monitor.join()
        result = {
            "corpus_mb": round(n_bytes / 2**20, 1),
            "tokens": meta["train_tokens"] + meta["val_tokens"],
            "seconds": round(seconds, 2),
            "mb_per_s": round(n_bytes / 2**20 / seconds, 2),
            "rss_before_mb": round(baseline, 1),
            "peak_rss_mb": round(monitor.peak, 1),
            "peak_anon_mb": round(monitor.peak_anon, 1),
            "cache_mb": round(sum(f.stat().st_size for f in dm.folder.glob("*.bin")) / 2**20, 1),
            "cache_files": len(list(dm.folder.glob("*.bin"))),
            "loader_batches_per_s": round(loader_rate, 1),
            "train_steps_per_s": round(steps_rate, 2),
            "train_peak_rss_mb": round(train_monitor.peak, 1),
            "train_peak_anon_mb": round(train_monitor.peak_anon, 1),
            "cores": os.cpu_count(),
        }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
