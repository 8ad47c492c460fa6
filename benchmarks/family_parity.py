"""Each model family against transformers, as numbers: the tiny random models of ``tests/test_families.py`` (built
with transformers' classes and the real models' feature flags, saved with ``save_pretrained``).

    python benchmarks/family_parity.py

Per case: the largest |logit difference| against transformers (fp32, 2 x 40 tokens), whether greedy generation
(24 tokens after a 4-token prompt, 3x past an 8-token sliding window) equals transformers' ``generate`` token for
token, the same for our exported folder read by transformers (same ``model_type`` written back), and the largest
difference of logits fed through the KV cache one token at a time against one full forward. Prints a Markdown
table.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_families as cases  # noqa: E402  (the cases are the tests')

from lm_lightning.export import export_pretrained, load_model  # noqa: E402
from lm_lightning.generate import generate_tokens  # noqa: E402
from lm_lightning.model import KVCache  # noqa: E402


def greedy(model, hf, prompt: torch.Tensor) -> bool:
    with torch.no_grad():
        expected = hf.generate(prompt[None], do_sample=False, max_new_tokens=cases.NEW_TOKENS, min_new_tokens=cases.NEW_TOKENS,
                               pad_token_id=hf.config.eos_token_id)[0, len(prompt):]
        ours = torch.cat(list(generate_tokens(model, prompt, cases.NEW_TOKENS, 1, lambda logits: logits.argmax(-1))))
    return ours.tolist() == expected.tolist()


def main() -> None:
    cases.transformers.utils.logging.disable_progress_bar()
    cases.transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = cases.make_tokenizer()
    prompt = torch.tensor(tokenizer.encode("The quick brown fox").ids)
    print("| case | model_type | max abs logit diff | greedy equal | export: model_type, max abs diff | KV cache vs full forward |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases.CASES:
            folder = cases.make_folder(name, tokenizer, Path(tmp) / name)
            model, hf = load_model(folder), cases.hf_model(folder)
            x = cases.ids(model.config.vocab_size)
            with torch.no_grad():
                diff = (model(x) - hf(x).logits).abs().max().item()
                export_pretrained(model, tokenizer, Path(tmp) / f"{name}-out")
                exported = cases.hf_model(Path(tmp) / f"{name}-out")
                export_diff = (model(x) - exported(x).logits).abs().max().item()
                cache = KVCache(model.config, 2, x.shape[1], torch.device("cpu"), torch.float32)
                stepped = torch.cat([model(x[:, :4], cache)] + [model(x[:, t : t + 1], cache) for t in range(4, x.shape[1])], dim=1)
                cache_diff = (stepped - model(x)).abs().max().item()
            same = "yes" if greedy(model, hf, prompt) else "NO"
            print(f"| {name} | {model.config.family} | {diff:.1e} | {same} | {exported.config.model_type}, {export_diff:.1e} | {cache_diff:.1e} |")


if __name__ == "__main__":
    main()
