"""Startup time of ``lm-lightning``: median wall time of a few commands against ``python -c "import torch"``,
measured in the same run, round-robin (a change in the machine's load moves them all alike).

    python benchmarks/startup.py                                 # the package as installed / on PYTHONPATH
    python benchmarks/startup.py --root /tmp/before --root .     # checkouts side by side (e.g. before and after a change)

Prints a table of median seconds and the ratio to importing torch, per checkout, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import train_tokenizer


IMPORT_LIGHTNING = "from lm_lightning.cli import _without_unused_torchmetrics_backends as hidden\nwith hidden(): import lightning.pytorch"


def tiny_checkpoint(path: Path) -> Path:
    """A training checkpoint of an untrained tiny model, with the keys ``load_gpt`` reads."""
    tokenizer = train_tokenizer(["The quick brown fox jumps over the lazy dog. " * 50], 300)
    config = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_size=tokenizer.get_vocab_size())
    state = {f"model.{k}": v for k, v in GPT(config).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": asdict(config), "tokenizer_json": tokenizer.to_str()}, path)
    return path


def seconds(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", action="append", help="a checkout whose lm_lightning package to time (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    envs = {}
    for root in args.root or [""]:
        env = dict(os.environ)
        if root:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(root).resolve()), env.get("PYTHONPATH")]))
        envs[root or "installed"] = env
    exe = str(Path(sys.executable).with_name("lm-lightning"))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(tiny_checkpoint(Path(tmp) / "tiny.ckpt"))
        commands = {
            "lm-lightning --help": [exe, "--help"],
            "lm-lightning generate --help": [exe, "generate", "--help"],
            "lm-lightning fit --help": [exe, "fit", "--help"],
            "lm-lightning generate (20 tokens)": [exe, "generate", "--ckpt_path", ckpt, "--max_new_tokens", "20", "--seed", "1"],
        }
        times: dict[str, dict[str, list[float]]] = {root: {} for root in envs}
        torch_times, lightning_times = [], []
        for _ in range(args.repeats):
            torch_times.append(seconds([sys.executable, "-c", "import torch"], dict(os.environ)))
            # The floor of fit/validate/test, whose options are Lightning's classes: importing Lightning itself, as
            # they import it (torchmetrics kept from importing transformers, scipy and matplotlib).
            lightning_times.append(seconds([sys.executable, "-c", IMPORT_LIGHTNING], dict(os.environ)))
            for root, env in envs.items():
                for name, command in commands.items():
                    times[root].setdefault(name, []).append(seconds(command, env))
    torch_s, lightning_s = statistics.median(torch_times), statistics.median(lightning_times)
    result = {"repeats": args.repeats, "import_torch_s": torch_s, "import_lightning_s": lightning_s, "median_s": {}}
    print(f"{'python -c import torch':<36} {torch_s:>9.2f} s")
    print(f"{'import lightning.pytorch (as fit does)':<36} {lightning_s:>9.2f} s {lightning_s / torch_s:>8.2f} x torch")
    for root, by_command in times.items():
        print(f"\n{root}\n{'command':<36} {'median s':>9} {'x torch':>8}")
        result["median_s"][root] = {}
        for name, values in by_command.items():
            median = statistics.median(values)
            result["median_s"][root][name] = median
            print(f"{name:<36} {median:>9.2f} {median / torch_s:>8.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
