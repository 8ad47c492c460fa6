"""Generation speed: ours (KV cache, ``lm_lightning.generate``) against transformers' ``generate`` on the same weights.

    python benchmarks/generate_speed.py                              # a fresh model of conf/default.yaml's shape
    python benchmarks/generate_speed.py --ckpt_path runs/.../best.ckpt
    python benchmarks/generate_speed.py --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50257
    python benchmarks/generate_speed.py --device cuda --batch_sizes 1 32 --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50257

Prefill and decode are timed apart, at batch 1 and 8, as the median of ``--repeats`` runs after a
warm-up: prefill is generating 1 token, decode is the time of the other ``max_new_tokens - 1``
tokens per token. Both sample (temperature 1, no top-k or top-p) and never stop early. A batch here
is ``num_samples`` samples of one prompt: we prefill the prompt once and share it, transformers
prefills each copy. Prints a table and a JSON line; needs ``transformers`` (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from lm_lightning.export import export_pretrained
from lm_lightning.generate import TextGenerator, generate_tokens, next_token
from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import train_tokenizer


def fresh_generator(args: argparse.Namespace) -> TextGenerator:
    """A randomly initialised model of the given shape, with a small byte-level tokenizer."""
    torch.manual_seed(0)
    config = GPTConfig(args.vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd)
    tokenizer = train_tokenizer(["a small text to train a tokenizer on"], 300)
    return TextGenerator(GPT(config).eval(), tokenizer)


def median_seconds(run, repeats: int) -> float:
    def timed() -> float:
        start = time.perf_counter()
        run()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a GPU's kernels run after the Python that queued them
        return time.perf_counter() - start

    timed()  # warm-up
    times = [timed() for _ in range(repeats)]
    return statistics.median(times)


def ours(model: GPT, prompt: torch.Tensor, batch: int, new_tokens: int) -> None:
    for _ in generate_tokens(model, prompt, new_tokens, batch, lambda logits: next_token(logits, 1.0)):
        pass


def theirs(model, prompt: torch.Tensor, batch: int, new_tokens: int) -> None:
    model.generate(
        prompt[None].expand(batch, -1),
        attention_mask=torch.ones(batch, len(prompt), dtype=torch.long, device=prompt.device),
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
    )


def measure(run, model, prompt: torch.Tensor, batch: int, new_tokens: int, repeats: int) -> dict:
    prefill = median_seconds(lambda: run(model, prompt, batch, 1), repeats)
    total = median_seconds(lambda: run(model, prompt, batch, new_tokens), repeats)
    decode = max(total - prefill, 1e-9) / (new_tokens - 1)
    return {
        "prefill_ms": 1000 * prefill,
        "prefill_tokens_per_s": batch * len(prompt) / prefill,
        "decode_ms_per_step": 1000 * decode,
        "decode_tokens_per_s": batch / decode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", help="checkpoint or exported folder; unset: a fresh model of the shape below")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads; unset: torch's default (one per core)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    ours_gen = TextGenerator.load(args.ckpt_path) if args.ckpt_path else fresh_generator(args)
    model = ours_gen.model.to(args.device)
    config = model.config
    if args.prompt_tokens + args.max_new_tokens > config.block_size:
        parser.error(f"prompt_tokens + max_new_tokens must fit in block_size={config.block_size}")
    with tempfile.TemporaryDirectory() as folder:
        export_pretrained(model, ours_gen.tokenizer, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval().to(args.device)
    prompt = torch.randint(0, len(ours_gen.table), (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).to(args.device)

    shape = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    print(f"model {shape}, {model.num_params() / 1e6:.1f}M parameters, torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens, {args.max_new_tokens} new tokens")
    print(f"{'batch':>5} {'phase':>8} {'ours tok/s':>11} {'hf tok/s':>11} {'ours/hf':>8}")
    results = []
    for batch in args.batch_sizes:
        a = measure(ours, model, prompt, batch, args.max_new_tokens, args.repeats)
        b = measure(theirs, hf, prompt, batch, args.max_new_tokens, args.repeats)
        for phase in ("prefill", "decode"):
            key = f"{phase}_tokens_per_s"
            print(f"{batch:>5} {phase:>8} {a[key]:>11.0f} {b[key]:>11.0f} {a[key] / b[key]:>7.2f}x")
        results.append({"batch": batch, "ours": a, "transformers": b})
    print(json.dumps({"shape": shape, "device": args.device, "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
                      "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
