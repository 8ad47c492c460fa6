"""Conversations as training data: ``messages`` / ``prompt``+``completion`` records rendered with a chat template,
the assistant's tokens marked beside the token cache, the loss and validation on them only, the template saved
with the model, chat samples in MLflow, and one line for each bad record."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG, run_cli, run_main, workdir

NAMES = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay"]


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name, number = rng.choice(NAMES), rng.randint(100, 999)
        if i % 3 == 0:  # the prompt/completion form
            records.append({"prompt": f"{name} has {number}. What does {name} have?", "completion": str(number)})
        else:
            records.append({"messages": [
                {"role": "system", "content": f"{name} has {number}."},
                {"role": "user", "content": f"What does {name} have?"},
                {"role": "assistant", "content": str(number)},
            ]})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def built_cache(tmp_path, records, **settings):
    from lm_lightning.data.cache import TokenCache

    cache = TokenCache(
        path=str(write_jsonl(tmp_path / "chat.jsonl", records)), cache_dir=tmp_path / "cache", tokenizer_path=None,
        vocab_size=settings.pop("vocab_size", 300), val_fraction=settings.pop("val_fraction", 0.2), jsonl_field="text",
        tokenizer_sample_bytes=1 << 20, shard_tokens=settings.pop("shard_tokens", 1 << 20), **settings,
    )
    cache.build()
    return cache, *cache.open()


def test_the_mask_marks_each_answer_and_its_end_of_turn_and_splits_fall_between_conversations(tmp_path):
    records = conversations(60)
    cache, meta, tokenizer, tokens, chats = built_cache(tmp_path, records, shard_tokens=500)
    assert len(tokens["train"].shards) > 1  # masks and starts are sharded like the tokens
    assert len(chats["train"]) + len(chats["val"]) == len(records)
    assert len(chats["val"]) > 0
    answers = []
    for split in ("train", "val"):
        c = chats[split]
        assert c.starts[-1] == len(tokens[split])
        for i in range(len(c)):
            ids = tokens[split][int(c.starts[i]) : int(c.starts[i + 1])]
            mask = c.mask[int(c.starts[i]) : int(c.starts[i + 1])].astype(bool)
            assert tokenizer.decode(ids[:1].tolist(), skip_special_tokens=False) == "<|im_start|>"  # a whole conversation
            answers.append(tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False))
    expected = [(r.get("completion") or r["messages"][-1]["content"]) + "<|im_end|>\n" for r in records]
    assert answers == expected
    assert meta["chat_template"].startswith("{% for message in messages %}")


def test_the_tokenizer_we_train_has_the_chat_markers_as_special_tokens(tmp_path):
    _, _, tokenizer, _, _ = built_cache(tmp_path, conversations(30))
    for marker in ("<|im_start|>", "<|im_end|>"):
        (token,) = tokenizer.encode(f"a{marker}b").ids[1:2]
        assert tokenizer.id_to_token(token) == marker


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"messages": "hi"}], "chat.jsonl line 1: messages must be a non-empty list of {role, content} objects"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "chat.jsonl line 1: message 1 has unknown role 'robot'"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "chat.jsonl line 1: the conversation has no assistant turn"),
        ([{"prompt": "q", "completion": 3}], "chat.jsonl line 1: prompt and completion must both be strings"),
        ([*conversations(3), {"text": "plain"}], "chat.jsonl holds plain text in a corpus of conversations"),
        ([{"text": "plain"}, *conversations(3)], "chat.jsonl line 2 holds a conversation in a corpus of plain text"),
    ],
)
def test_a_bad_record_is_one_line_naming_it(tmp_path, records, message):
    from lm_lightning.errors import UserError

    with pytest.raises(UserError) as e:
        built_cache(tmp_path, records)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_tokenizer_without_markers_or_template_is_refused(tmp_path):
    from lm_lightning.chat_template import ChatError, training_template
    from lm_lightning.tokenizer import EOT, save_tokenizer
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.WordLevel({EOT: 0, "a": 1}, unk_token=EOT))
    save_tokenizer(plain, tmp_path / "tokenizer.json")
    with pytest.raises(ChatError, match="has no <|im_start|> or <|im_end|> token and no chat template"):
        training_template(str(tmp_path / "tokenizer.json"), plain)


def test_batches_are_padded_rows_that_start_at_a_conversation_and_repeat_exactly(tmp_path):
    from lm_lightning.data.windows import ConversationBatches, ConversationRows

    _, _, tokenizer, tokens, chats = built_cache(tmp_path, conversations(40))
    pad = tokenizer.token_to_id("<|endoftext|>")
    batches = ConversationBatches(tokens["train"], chats["train"], block_size=64, batch_size=4, seed=3, pad_id=pad)
    ids, trained = batches[(0, 5)]
    again = batches[(0, 5)]
    assert torch.equal(ids, again[0]) and torch.equal(trained, again[1])
    start = tokenizer.token_to_id("<|im_start|>")
    assert (ids[:, 0] == start).all()
    for row, targets in zip(ids, trained):
        length = int((row != pad).sum())
        assert not targets[length:].any()  # padding is never a target
        assert targets[:length].any()
    everything = ConversationBatches(tokens["train"], chats["train"], 64, 4, 3, pad, all_targets=True)[(0, 5)][1]
    assert torch.equal(everything, ids != pad)
    rows = ConversationRows(tokens["val"], chats["val"], block_size=64, pad_id=pad)
    assert len(rows) == len(chats["val"])
    cut = ConversationRows(tokens["val"], chats["val"], block_size=4, pad_id=pad).collate([0])[0]
    assert cut.shape == (1, 5)  # a conversation longer than block_size + 1 is cut there


def test_the_loss_and_validation_count_the_assistant_tokens_only():
    from lm_lightning.module import LanguageModel

    torch.manual_seed(0)
    module = LanguageModel(block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    module.token_bytes = torch.arange(50) % 4
    ids = torch.randint(0, 50, (3, 12))
    trained = torch.rand(3, 12) > 0.5
    logits = module.model(ids[:, :-1])
    losses = F.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="none")
    keep = trained[:, 1:].reshape(-1)
    loss, got, targets, mask = module._token_losses((ids, trained))
    assert torch.equal(mask, keep)
    assert torch.allclose(loss, losses[keep].mean())  # what training steps on: the mean over the assistant's tokens
    module.validation_step((ids, trained), 0)
    assert module.val_tokens.compute() == keep.sum()
    assert torch.allclose(module.val_nats.compute(), losses[keep].sum())
    assert module.val_bytes.compute() == module.token_bytes[ids[:, 1:].reshape(-1)[keep]].sum()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny fit on conversations, in process, with MLflow samples."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("chat_run")
    (root / "tiny.yaml").write_text(TINY_CONFIG, encoding="utf-8")
    records = conversations(80)
    records[5] = {"messages": [{"role": "user", "content": "long " * 60}, {"role": "assistant", "content": "ok"}]}
    write_jsonl(root / "chat.jsonl", records)
    with workdir(root) as uri, pytest.warns(UserWarning, match=r"conversations are longer than block_size \+ 1 = 65"):
        code = run_main("fit", "--config", "tiny.yaml", "--data.path", "chat.jsonl", "--model.block_size", "64",
                        "--trainer.max_steps", "20", "--samples.max_new_tokens", "4", "--trainer.default_root_dir", str(root))
    assert code == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lm_lightning").experiment_id])
    return root, client, run


def test_a_chat_run_saves_its_template_and_logs_answers_to_held_out_conversations(chat_run):
    from lm_lightning.chat_template import DEFAULT_TEMPLATE
    from lm_lightning.checkpoint import load_checkpoint

    root, client, run = chat_run
    (last,) = root.glob("**/last.ckpt")
    assert load_checkpoint(last)["chat_template"] == DEFAULT_TEMPLATE
    assert math.isfinite(run.data.metrics["val/loss"])
    text = Path(client.download_artifacts(run.info.run_id, "samples/step_000020.txt", str(root))).read_text()
    assert text.count("<|im_start|>assistant\n") == 2  # two held-out conversations, up to the answer
    assert "What does" in text


def test_chat_answers_from_a_chat_run_checkpoint(chat_run):
    root, _, _ = chat_run
    (last,) = root.glob("**/last.ckpt")
    result = run_cli("chat", "--ckpt_path", str(last), "--system", "Bo has 123.", "--prompt", "What does Bo have?",
                     "--temperature", "0", "--max_new_tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and "What does" not in result.stdout  # the answer alone (a 20-step model's)


def test_evaluate_on_conversations_scores_the_assistant_tokens(chat_run):
    from lm_lightning.chat_template import load_chat_template
    from lm_lightning.evaluate import evaluate_model, read_tokens
    from lm_lightning.pretrained import load_source

    root, _, _ = chat_run
    (last,) = root.glob("**/last.ckpt")
    model, tokenizer, _ = load_source(last)
    template = load_chat_template(last)
    corpus = read_tokens(str(root / "chat.jsonl"), tokenizer, template=template)
    c = corpus.conversations
    assert len(c) == 80 and 0 < c.mask.sum() < len(corpus.tokens)
    in_window = sum(int(c.mask[int(a) + 1 : min(int(b), int(a) + 65)].sum()) for a, b in zip(c.starts[:-1], c.starts[1:]))
    with pytest.warns(UserWarning, match="assistant tokens are past the model's block_size"):  # the long one's answer
        scores = evaluate_model(model, tokenizer, str(root / "chat.jsonl"), template=template)
    assert scores.tokens == in_window < c.mask.sum() and math.isfinite(scores.loss)
    with pytest.raises(Exception, match="has no chat template to render them"):
        read_tokens(str(root / "chat.jsonl"), tokenizer)


def test_lora_on_a_chat_folder_trains_in_its_template_and_keeps_it(tmp_path, transformers_offline):
    from test_chat import QWEN, qwen_chat_folder
    from transformers import AutoTokenizer

    from lm_lightning.chat_template import load_chat_template
    from lm_lightning.checkpoint import load_checkpoint
    from lm_lightning.data.cache import TokenCache

    folder, _, _ = qwen_chat_folder(tmp_path)
    records = conversations(40)
    write_jsonl(tmp_path / "chat.jsonl", records)
    shapeless = "\n".join(line for line in TINY_CONFIG.splitlines() if not line.strip().startswith(("n_", "block_size", "vocab_size")))
    (tmp_path / "tiny.yaml").write_text(shapeless, encoding="utf-8")
    with workdir(tmp_path):
        code = run_main("fit", "--config", "tiny.yaml", "--data.path", "chat.jsonl", "--model.init_from", str(folder),
                        "--model.lora_r", "4", "--trainer.max_steps", "4", "--samples.max_new_tokens", "2",
                        "--trainer.default_root_dir", str(tmp_path / "runs"))
    assert code == 0
    (last,) = (tmp_path / "runs").glob("**/last.ckpt")
    checkpoint = load_checkpoint(last)
    assert "lora_base" in checkpoint and checkpoint["chat_template"] == QWEN
    # The cache holds the conversations as transformers' apply_chat_template tokenizes them.
    cache = TokenCache("chat.jsonl", tmp_path / "cache", str(folder), 0, 0.1, "text", 1 << 20, 100_000_000)
    _, _, tokens, chats = cache.open()
    messages = records[1]["messages"]
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert tokens["train"][int(chats["train"].starts[1]) : int(chats["train"].starts[2])].tolist() == list(expected)
    assert load_chat_template(last).source == QWEN  # what chat and serve answer in
