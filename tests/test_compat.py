"""A checkpoint written by lm_lightning 0.1 (before the package was reshaped) still loads, generates and resumes.

``tests/data/checkpoint-v0.1.ckpt`` is a real ``last.ckpt`` of a 6-step fit (1 layer, 16 wide, vocabulary
300); ``checkpoint-v0.1.json`` holds the logits that version computed for fixed input ids.
"""

import json
from pathlib import Path

import torch

from lm_lightning.checkpoint import TOKENIZER_KEY, load_checkpoint, load_gpt

from conftest import english_text, run_main

DATA = Path(__file__).parent / "data"
OLD = DATA / "checkpoint-v0.1.ckpt"


def test_old_checkpoint_gives_the_logits_it_gave():
    expected = json.loads((DATA / "checkpoint-v0.1.json").read_text(encoding="utf-8"))
    model, tokenizer = load_gpt(OLD)
    logits = model(torch.tensor([expected["input_ids"]]))[0, -1, :8]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits_first8"]), rtol=0, atol=1e-6)
    assert tokenizer.get_vocab_size() == 300


def test_old_checkpoint_resumes(tmp_path, mlflow_store):
    old = load_checkpoint(OLD)
    (tmp_path / "tokenizer.json").write_text(old[TOKENIZER_KEY], encoding="utf-8")
    (tmp_path / "corpus.txt").write_text(english_text(30_000), encoding="utf-8")
    code = run_main(
        "fit", "--data.path", str(tmp_path / "corpus.txt"), "--data.tokenizer_path", str(tmp_path / "tokenizer.json"),
        "--data.batch_size", "4", "--model.block_size", "16", "--model.n_layer", "1", "--model.n_head", "2",
        "--model.n_embd", "16", "--model.learning_rate", "3e-3", "--model.warmup_steps", "2",
        "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
        "--last_checkpoint.dirpath", str(tmp_path / "ckpt"), "--ckpt_path", str(OLD),
    )
    assert code == 0
    resumed = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert resumed["global_step"] == 8
    assert resumed[TOKENIZER_KEY] == old[TOKENIZER_KEY]
