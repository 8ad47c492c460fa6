"""A LoRA run exports as its base's family, merged, and as a PEFT adapter folder that peft loads onto the base:
both give our logits (with the adapters) within 1e-4; gpt2 (Conv1D, fan_in_fan_out), llama and qwen3 folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_main, single_thread
from lm_lightning.checkpoint import load_checkpoint
from lm_lightning.lora import adapted_model
from test_pretrained import FAMILIES, TEXT, fit_args, make_folder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_and_peft_exports_give_our_logits(family, tmp_path, mlflow_store, capsys):
    base = make_folder(family, tmp_path / family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    with single_thread():
        assert run_main(*fit_args(base, corpus, "--model.lora_r", "4", "--model.lora_targets", "[all]",
                                  "--model.learning_rate", "3e-2", "--model.warmup_steps", "0")) == 0
    (ckpt,) = Path("runs").glob("*/*/checkpoints/last.ckpt")
    ours, _, _ = adapted_model(load_checkpoint(ckpt), ckpt)
    assert any(layer.lora_B.abs().sum() > 0 for layer in ours.modules() if hasattr(layer, "lora_B"))  # trained
    x = torch.randint(0, 250, (2, 24))
    with torch.no_grad():
        expected = ours(x)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        assert not torch.allclose(hf_base(x).logits, expected, atol=1e-3)  # the adapters change the outputs

    assert run_main("export", "--ckpt_path", str(ckpt), "--out", "merged") == 0
    assert json.loads(Path("merged/config.json").read_text())["model_type"] == family
    merged = transformers.AutoModelForCausalLM.from_pretrained("merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, rtol=0, atol=1e-4)

    assert run_main("export", "--ckpt_path", str(ckpt), "--out", "adapter", "--adapter", "true") == 0
    assert {p.name for p in Path("adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(Path("adapter/adapter_config.json").read_text())["fan_in_fan_out"] == (family == "gpt2")
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), "adapter").eval()
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-4)


def test_adapter_export_of_a_full_run_is_one_line(tmp_path, mlflow_store, capsys):
    base = make_folder("gpt2", tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    with single_thread():
        assert run_main(*fit_args(base, corpus)) == 0
    (ckpt,) = Path("runs").glob("*/*/checkpoints/last.ckpt")
    capsys.readouterr()
    assert run_main("export", "--ckpt_path", str(ckpt), "--out", "adapter", "--adapter", "true") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint of a LoRA run" in err[0]
