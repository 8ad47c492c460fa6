"""Supervised fine-tuning on conversations: does the whole loop teach a model a task it could not do?

    python benchmarks/sft.py                                # ~8 minutes on 2 CPU cores
    python benchmarks/sft.py --facts 2 --sft_steps 1500     # recall among two facts

The task, written by the benchmark itself: a system turn states ``--facts`` facts ("Bo has 193.", or with 3: "Ana has
482. Bo has 193. Cy has 556."), the user asks for one of them ("What does Bo have?"), the assistant answers with that
fact ("Bo has 193.").
Names and numbers are drawn at random, so the held-out conversations (their own facts) can only be answered by
reading the system turn. A base model of ours is first trained from scratch on the built-in corpus (plain text:
it has never seen a conversation), then fine-tuned on the training conversations with ``lm-lightning fit
--model.init_from base.ckpt``, twice: with the loss on the assistant's tokens only (the default) and on every
token (``--data.assistant_only_loss false``). Each model answers every held-out question greedily through
``lm-lightning chat``'s own code (``commands.answer_pieces``: the chat template, the end-of-turn stop);
exact match of the answer. Also the share of a batch's positions that are padding (what packing would save).
Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Max", "Ned", "Oz", "Pia"]


def conversation(rng: random.Random, n_facts: int) -> list[dict]:
    names = rng.sample(NAMES, n_facts)
    numbers = [str(rng.randint(100, 999)) for _ in names]
    facts = " ".join(f"{name} has {number}." for name, number in zip(names, numbers))
    asked = rng.randrange(n_facts)
    return [
        {"role": "system", "content": facts},
        {"role": "user", "content": f"What does {names[asked]} have?"},
        {"role": "assistant", "content": f"{names[asked]} has {numbers[asked]}."},
    ]


def write_jsonl(path: Path, conversations: list[list[dict]]) -> None:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")


def fit(config: str, args: list[str], workdir: Path, experiment: str) -> tuple[Path, float]:
    """``lm-lightning fit --config conf/<config>`` in a child process; the run's ``last.ckpt`` and its seconds."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "LM_LIGHTNING_CACHE": str(workdir / "cache")}
    exe = str(Path(sys.executable).with_name("lm-lightning"))
    command = [exe, "fit", "--config", str(ROOT / "conf" / config), *args, "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.experiment_name", experiment, "--trainer.logger.init_args.log_model", "false",
               "--trainer.default_root_dir", str(workdir / experiment)]
    start = time.perf_counter()
    out = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return max((workdir / experiment).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime), time.perf_counter() - start


def exact_match(ckpt: Path, held_out: list[list[dict]]) -> tuple[float, list[str]]:
    """The fraction of held-out questions answered exactly, greedily, as ``lm-lightning chat`` answers them."""
    from lm_lightning.chat_template import training_template
    from lm_lightning.commands import answer_pieces
    from lm_lightning.generate import Sampling, TextGenerator
    from lm_lightning.pretrained import load_source

    model, tokenizer, info = load_source(ckpt)
    template = training_template(str(ckpt), tokenizer)  # the base has none of its own: the default it is tuned with
    generator = TextGenerator(model, tokenizer, (*info.stop_tokens, *template.stop_token_ids(tokenizer)))
    settings = Sampling(max_new_tokens=8, temperature=0.0)
    answers = ["".join(answer_pieces(generator, template, c[:-1], settings)).strip() for c in held_out]
    return sum(a == c[-1]["content"] for a, c in zip(answers, held_out)) / len(held_out), answers[:3]


def padding_share(cache: Path, batch_size: int, block_size: int) -> float:
    """The share of the positions a fine-tuning batch computes that are padding, over 500 batches drawn as
    ``ConversationBatches`` draws them: what packing the conversations would save."""
    import numpy as np

    (meta_path,) = [p for p in cache.glob("*/meta.json") if json.loads(p.read_text()).get("chat_template")]
    meta = json.loads(meta_path.read_text())
    starts = np.concatenate([np.fromfile(p, dtype=np.int64) for p in sorted(meta_path.parent.glob("train-*.starts"))])
    lengths = np.minimum(np.diff(np.append(starts, meta["train_tokens"])), block_size + 1)
    rows = np.random.default_rng(0).integers(0, len(lengths), size=(500, batch_size))
    return float(1 - lengths[rows].sum() / (lengths[rows].max(axis=1) * batch_size).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000, help="training conversations")
    parser.add_argument("--held_out", type=int, default=200, help="held-out conversations (exact match)")
    parser.add_argument("--facts", type=int, default=1, help="facts per system turn (more: recall, slower to learn)")
    parser.add_argument("--base_steps", type=int, default=300, help="steps of the base model on the built-in corpus")
    parser.add_argument("--sft_steps", type=int, default=800, help="fine-tuning steps on the conversations")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak fine-tuning learning rate")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder); a base already there is reused")
    a = parser.parse_args()
    shape = ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "128"]
    rng = random.Random(0)
    train = [conversation(rng, a.facts) for _ in range(a.train)]
    held_out = [conversation(rng, a.facts) for _ in range(a.held_out)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(a.workdir or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp / "train.jsonl", train)
        if a.workdir and list((tmp / "base").glob("**/last.ckpt")):
            base, seconds = next((tmp / "base").glob("**/last.ckpt")), 0.0
        else:
            base, seconds = fit("default.yaml", [*shape, "--trainer.max_steps", str(a.base_steps), "--trainer.val_check_interval",
                                 str(a.base_steps), "--data.batch_size", "16"], tmp, "base")
        accuracy, examples = exact_match(base, held_out)
        rows.append({"model": "base (built-in corpus, no conversations)", "exact_match": accuracy, "fit_s": seconds, "examples": examples})
        print(rows[-1], file=sys.stderr, flush=True)
        sft = ["--model.init_from", str(base), "--data.path", str(tmp / "train.jsonl"), "--trainer.max_steps", str(a.sft_steps),
               "--trainer.val_check_interval", str(a.sft_steps), "--data.batch_size", "32", "--model.learning_rate", str(a.lr),
               "--model.warmup_steps", "50", "--data.val_fraction", "0.05",
               "--early_stopping.patience", "1000", "--model.weight_decay", "0.1"]
        for name, extra in (("fine-tuned, loss on assistant tokens", []), ("fine-tuned, loss on every token", ["--data.assistant_only_loss", "false"])):
            ckpt, seconds = fit("finetune.yaml", [*sft, *extra], tmp, f"{name.split()[-2]}-{time.time_ns()}")
            accuracy, examples = exact_match(ckpt, held_out)
            rows.append({"model": name, "exact_match": accuracy, "fit_s": seconds, "examples": examples})
            print(rows[-1], file=sys.stderr, flush=True)
        padding = padding_share(tmp / "cache", 32, 128)
    print(f"{a.train} training conversations, {a.held_out} held out, {a.facts} facts each; base {a.base_steps} steps, "
          f"fine-tuning {a.sft_steps} steps (4 layers x 128, block 128)")
    print(f"{'model':45} {'exact match':>12} {'fit s':>7}")
    for row in rows:
        print(f"{row['model']:45} {row['exact_match']:12.1%} {row['fit_s']:7.0f}")
    print(f"padding: {padding:.1%} of the positions of a fine-tuning batch (32 conversations, padded to the longest)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
