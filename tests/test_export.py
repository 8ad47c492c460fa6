"""Export to a transformers GPT-2 folder: transformers loads it offline, with our logits and our tokenization."""

import json

import pytest
import torch

from lm_lightning.cli import main
from lm_lightning.export import export_pretrained, load_pretrained
from lm_lightning.generate import TextGenerator
from lm_lightning.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread", "transformers_offline")

TEXTS = ["def generate(self, prompt):\n    return 'hello world'", "床前明月光，疑是地上霜。", "mixed 中文 and English"]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "gpt"
    main(["export", "--ckpt_path", str(tiny_run["checkpoint"]), "--out", str(out)])
    return out


def hf_logits(folder, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_export_writes_a_transformers_folder(exported):
    assert {p.name for p in exported.iterdir()} == {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    }
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == tokenizer_config["bos_token"] == "<|endoftext|>"


def test_transformers_gives_our_logits_and_our_tokens(exported, tiny_run):
    ours = TextGenerator.load(tiny_run["checkpoint"])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert model.config.model_type == "gpt2" and hf_tokenizer.eos_token_id == ours.eot_id
    for text in TEXTS:
        ids = ours.tokenizer.encode(text).ids
        assert hf_tokenizer(text)["input_ids"] == ids
        assert hf_tokenizer.decode(ids) == text
        window = torch.tensor([ids[-ours.model.config.block_size :]])
        with torch.no_grad():
            torch.testing.assert_close(model(window).logits, ours.model(window), rtol=0, atol=1e-4)


def test_transformers_greedy_generate_matches_ours(exported, tiny_run):
    ours = TextGenerator.load(tiny_run["checkpoint"])
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = ours.tokenizer.encode("The ").ids
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, min_new_tokens=20)
    assert ours.tokenizer.decode(out[0, len(ids) :].tolist()) == ours.generate("The ", max_new_tokens=20, temperature=0)[0]


def test_model_without_biases_exports_zero_biases(tiny_run, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=420, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.1)).eval()
    tokenizer = TextGenerator.load(tiny_run["checkpoint"]).tokenizer
    export_pretrained(model, tokenizer, tmp_path / "nobias")
    ids = tokenizer.encode(TEXTS[1]).ids[:16]
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "nobias", ids), model(torch.tensor([ids])), rtol=0, atol=1e-4)
    config = json.loads((tmp_path / "nobias" / "config.json").read_text())
    assert config["vocab_size"] == 420 and config["resid_pdrop"] == 0.1


def test_exported_folder_loads_back_for_our_generation(exported, tiny_run):
    model, _ = load_pretrained(exported)
    original = TextGenerator.load(tiny_run["checkpoint"]).model
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    kwargs = dict(max_new_tokens=12, num_samples=2, seed=4)
    assert TextGenerator.load(exported).generate("床前", **kwargs) == TextGenerator.load(tiny_run["checkpoint"]).generate("床前", **kwargs)


def test_export_refuses_a_folder_that_is_not_empty(tiny_run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    args = ["export", "--ckpt_path", str(tiny_run["checkpoint"]), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "exists and is not empty" in last and "--overwrite" in last
    main([*args, "--overwrite"])
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "notes.txt").read_text() == "mine"
