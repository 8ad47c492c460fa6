import math

import lightning as L
import pytest
import torch

from lm_lightning.data import TextDataModule
from lm_lightning.module import LanguageModel
from lm_lightning.optim import warmup_cosine


def test_schedule_warms_up_linearly_then_decays_to_min_lr():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_weight_decay_skips_biases_norms_and_embeddings():
    module = LanguageModel(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    shapes = lambda group: {tuple(p.shape) for p in group["params"]}  # noqa: E731
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(len(s) == 2 for s in shapes(decay)) and (50, 16) not in shapes(decay) and (8, 16) not in shapes(decay)
    assert (50, 16) in shapes(no_decay) and (16,) in shapes(no_decay)


def test_val_bpb_counts_exact_bytes_of_every_target(corpus):
    dm = TextDataModule(path=str(corpus), vocab_size=300, block_size=16, batch_size=4, val_batch_size=7)
    module = LanguageModel(block_size=16, n_layer=1, n_head=2, n_embd=16)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)

    # The same numbers by hand: every validation target's loss and its UTF-8 bytes.
    byte_len = dm.token_byte_lengths()
    nats = n_tokens = n_bytes = 0.0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = module.model(batch[:, :-1])
            nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            n_tokens += batch[:, 1:].numel()
            n_bytes += byte_len[batch[:, 1:]].sum().item()
    assert metrics["val/loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    assert metrics["val/bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(nats / n_tokens), rel=1e-5)
    # The validation text is all there, but for the block_size remainder: bytes of targets ~ bytes of the split.
    val_text_bytes = len(dm.tokenizer.decode(list(dm.tokens["val"][1:])).encode())
    assert val_text_bytes - n_bytes < 16 * 4


def test_model_vocab_defaults_to_the_tokenizer_and_is_saved_for_loading(corpus):
    dm = TextDataModule(path=str(corpus), vocab_size=300, block_size=16, batch_size=4)
    module = LanguageModel(block_size=16, n_layer=1, n_head=2, n_embd=16)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert module.hparams.vocab_size == dm.tokenizer.get_vocab_size() == module.model.config.vocab_size
    assert module.tokenizer_json == dm.tokenizer.to_str()
