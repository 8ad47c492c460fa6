"""Random training windows from a token cache that is not in memory: with and without read-ahead.

    python benchmarks/window_reads.py                 # a 1.2 GB cache file of random tokens in a temp dir

Evicts the file from the page cache before each pass (``posix_fadvise(DONTNEED)``), then gathers
batches of random ``block_size + 1`` windows as training does, and reports batches/s, bytes read from
disk and file pages mapped into the process, with the kernel's read-ahead on (a plain memory map) and
off (``TokenShards.open(random_access=True)``, what training uses).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lm_lightning.data.cache import TokenShards


def proc_value(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=600_000_000, help="tokens in the cache file (uint16)")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="where the cache file goes (default: a temp dir; not tmpfs)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "train-00000.bin"
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for start in range(0, args.tokens, 50_000_000):
                rng.integers(0, 8192, min(50_000_000, args.tokens - start), dtype=np.uint16).tofile(f)
        rows = []
        for random_access in (False, True, False, True):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            tokens = TokenShards.open([str(path)], [args.tokens], "uint16", random_access=random_access)
            rng = np.random.default_rng(1)
            read0 = proc_value("/proc/self/io", "read_bytes")
            mapped0 = proc_value("/proc/self/status", "RssFile")
            start = time.perf_counter()
            for _ in range(args.batches):
                tokens.windows(rng.integers(0, args.tokens - args.block_size, args.batch_size), args.block_size + 1)
            seconds = time.perf_counter() - start
            rows.append({
                "random_access": random_access,
                "batches_per_s": round(args.batches / seconds),
                "disk_read_mb": round((proc_value("/proc/self/io", "read_bytes") - read0) / 2**20, 1),
                "mapped_file_mb": round((proc_value("/proc/self/status", "RssFile") - mapped0) / 1024, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
            del tokens
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
