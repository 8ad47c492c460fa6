"""Starting from a pretrained model: what it costs against training from scratch, and against transformers.

    python benchmarks/pretrained.py                      # both parts
    python benchmarks/pretrained.py --part finetune      # fine-tuning vs from scratch only
    python benchmarks/pretrained.py --part gpt2          # 124M GPT-2 folder: load time and generate tokens/s

``finetune``: a random transformers GPT-2 folder of the given shape (saved with ``save_pretrained``, with a
byte-level BPE trained on the built-in corpus) is trained for ``--steps`` steps with
``lm-lightning fit --config conf/finetune.yaml --model.init_from FOLDER`` and, the same shape and tokenizer,
from scratch (``--data.tokenizer_path FOLDER`` and the shape flags); each in its own process. Reports the
median ``train/tokens_per_s`` logged to MLflow and the process's peak resident memory.

``gpt2``: a random 124M-parameter GPT-2 folder (``GPT2Config()`` defaults, ~500 MB) is loaded by us
(``TextGenerator.load``) and by transformers (``AutoModelForCausalLM`` and ``AutoTokenizer``; the faster of
two loads each), and both
generate 50 greedy tokens (never stopping early) from the same prompt at batch 1 and 5: median of
``--repeats`` after a warm-up. Needs transformers (the ``test`` extra). Prints a table and JSON.
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
from pathlib import Path

import torch
from generate_speed import median_seconds  # a sibling script, as ``python benchmarks/pretrained.py`` runs

ROOT = Path(__file__).resolve().parents[1]


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def random_folder(folder: Path, vocab_size: int, family: str = "gpt2", **shape) -> Path:
    """A random transformers folder (GPT-2, or ``family="qwen3"`` with ``shape`` its ``Qwen3Config`` keys) with a
    byte-level BPE of ``vocab_size`` tokens trained on the built-in corpus."""
    import transformers

    from lm_lightning.tokenizer import EOT, train_tokenizer

    tokenizer = train_tokenizer([corpus_text()], vocab_size)
    eot = tokenizer.token_to_id(EOT)
    config_class, model_class = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[family]
    config = getattr(transformers, config_class)(
        vocab_size=shape.pop("vocab_rows", tokenizer.get_vocab_size()), bos_token_id=eot, eos_token_id=eot, **shape)
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    # The generic fast tokenizer reads tokenizer.json as it is (GPT2TokenizerFast would rebuild GPT-2's pre-tokenizer).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def fit(args: list[str], workdir: Path, experiment: str) -> dict:
    """Run ``lm-lightning fit`` in a child process; its median tokens/s (MLflow), peak RSS (MB), and on a GPU the peak of
    its tensors (``train/peak_memory_mb``)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "LM_LIGHTNING_CACHE": str(workdir / "cache")}
    # A wrapper process per run: RUSAGE_CHILDREN's peak is over all children ever waited for.
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)")
    exe = str(Path(sys.executable).with_name("lm-lightning"))
    command = [sys.executable, "-c", wrapper, exe, "fit", "--config", str(ROOT / "conf/finetune.yaml"), *args,
               "--trainer.logger.init_args.experiment_name", experiment]
    out = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    peak_kb = int(out.stdout.split("PEAK_KB")[-1].split()[0])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")]
    row = {"tokens_per_s": statistics.median(rates[1:] or rates), "peak_rss_mb": peak_kb / 1024}
    if gpu := client.get_metric_history(run.info.run_id, "train/peak_memory_mb"):  # logged on a GPU only
        row["peak_gpu_mb"] = max(m.value for m in gpu)
    return row


def finetune_part(a: argparse.Namespace) -> list[dict]:
    shape = dict(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = random_folder(tmp / "gpt2", a.vocab_size, n_positions=a.block_size, **shape)
        (tmp / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
        common = ["--data.path", str(tmp / "corpus.txt"), "--data.batch_size", str(a.batch_size), "--model.block_size", str(a.block_size),
                  "--trainer.max_steps", str(a.steps), "--trainer.val_check_interval", str(a.steps), "--trainer.limit_val_batches", "1",
                  "--trainer.log_every_n_steps", "5", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
                  "--samples.prompts", "[]"]
        scratch = ["--data.tokenizer_path", str(folder), *(f"--model.{k}={v}" for k, v in shape.items())]
        runs = (("from scratch", scratch), ("fine-tune (init_from)", ["--model.init_from", str(folder)]))
        for name, extra in runs[::-1] if a.reverse else runs:
            rows.append({"run": name, **shape, "block_size": a.block_size, "batch_size": a.batch_size,
                         **fit([*common, *extra], tmp, name.split()[0])})
    return rows


def gpt2_part(a: argparse.Namespace) -> list[dict]:
    import transformers

    from lm_lightning.generate import TextGenerator, generate_tokens

    prompt_text = "我爱北京天安门"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_folder(Path(tmp) / "gpt2-124m", 4096, vocab_rows=50257)  # GPT2Config() defaults otherwise
        loaded = {}

        def load(name, function) -> float:  # the faster of two loads: the first also pays one-time import costs
            times = []
            for _ in range(2):
                start = time.perf_counter()
                loaded[name] = function()
                times.append(time.perf_counter() - start)
            return min(times)

        ours_load = load("ours", lambda: TextGenerator.load(folder))
        hf_load = load("hf", lambda: (transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
                                      transformers.AutoTokenizer.from_pretrained(folder)))
        ours, (hf, hf_tokenizer) = loaded["ours"], loaded["hf"]
        prompt = ours.encode_prompt(prompt_text)
        assert hf_tokenizer(prompt_text).input_ids == prompt.tolist()
        n_params = sum(p.numel() for p in ours.model.parameters())

        def run_ours(batch: int) -> None:
            for _ in generate_tokens(ours.model, prompt, a.new_tokens, batch, lambda logits: logits.argmax(-1)):
                pass

        def run_theirs(batch: int) -> None:
            with torch.no_grad():
                hf.generate(prompt[None].expand(batch, -1), attention_mask=torch.ones(batch, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0)

        rows.append({"what": "load (s)", "params": n_params, "ours": ours_load, "transformers": hf_load})
        print(f"loaded in {ours_load:.2f} s (ours), {hf_load:.2f} s (transformers)", file=sys.stderr, flush=True)
        for batch in (1, 5):
            ours_s = median_seconds(lambda: run_ours(batch), a.repeats)
            hf_s = median_seconds(lambda: run_theirs(batch), a.repeats)
            print(f"batch {batch}: {ours_s:.2f} s (ours), {hf_s:.2f} s (transformers)", file=sys.stderr, flush=True)
            rows.append({"what": f"generate tokens/s, batch {batch}", "params": n_params,
                         "ours": batch * a.new_tokens / ours_s, "transformers": batch * a.new_tokens / hf_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "finetune", "gpt2"), default="all")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--new_tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reverse", action="store_true", help="fine-tune first, then from scratch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a shared machine")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {"threads": torch.get_num_threads(), "cpu": os.cpu_count()}
    if a.part in ("all", "finetune"):
        result["finetune"] = finetune_part(a)
        print(f"{'run':<24}{'tokens/s':>10}{'peak RSS MB':>13}")
        for r in result["finetune"]:
            print(f"{r['run']:<24}{r['tokens_per_s']:>10.0f}{r['peak_rss_mb']:>13.0f}")
    if a.part in ("all", "gpt2"):
        result["gpt2"] = gpt2_part(a)
        print(f"{'124M GPT-2 folder':<34}{'ours':>10}{'transformers':>14}{'ratio':>7}")
        for r in result["gpt2"]:
            ratio = r["transformers"] / r["ours"] if r["what"].startswith("load") else r["ours"] / r["transformers"]
            print(f"{r['what']:<34}{r['ours']:>10.2f}{r['transformers']:>14.2f}{ratio:>7.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
