"""Starting from pretrained models: tiny random transformers GPT-2, Llama and Qwen3 folders (save_pretrained),
each with a tokenizer trained here, fine-tuned (fit --model.init_from), generated from and exported back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import CHINESE, english_text, metric_history, only_run, run_main, single_thread
from lm_lightning.checkpoint import load_gpt
from lm_lightning.data import TextDataModule
from lm_lightning.generate import TextGenerator, generate_tokens
from lm_lightning.tokenizer import folder_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = english_text(12_000) + "\n" + CHINESE * 10
PROMPT = "我爱北京天安门"
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, head_dim=8)
FAMILIES = ("gpt2", "llama", "qwen3")
FINETUNE = Path(__file__).resolve().parents[1] / "conf" / "finetune.yaml"


def byte_level_tokenizer(specials: list[str], bos: str | None = None) -> Tokenizer:
    """A byte-level BPE as Llama 3 and Qwen have, trained on ``TEXT``; ``bos`` put before every text by its post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def make_folder(family: str, folder: Path) -> Path:
    """A random transformers model of ``family`` with its tokenizer, saved as ``save_pretrained`` does. Its
    embeddings are scaled up so its loss is far from a fresh model's. GPT-2's tokenizer is vocab.json + merges.txt;
    Qwen3's embedding has spare rows past the tokenizer and declares <|im_end|> as its end of sequence."""
    torch.manual_seed(0)
    if family == "gpt2":
        tokenizer = train_tokenizer([TEXT], 300)
        eos = tokenizer.token_to_id("<|endoftext|>")
        config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=eos, eos_token_id=eos)
        hf = transformers.GPT2LMHeadModel(config)
    elif family == "llama":
        tokenizer = byte_level_tokenizer(["<s>", "</s>"], bos="<s>")
        config = transformers.LlamaConfig(**SHAPE, vocab_size=tokenizer.get_vocab_size(), bos_token_id=0, eos_token_id=1)
        hf = transformers.LlamaForCausalLM(config)
    else:
        tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        config = transformers.Qwen3Config(**SHAPE, vocab_size=tokenizer.get_vocab_size() + 8, eos_token_id=2, tie_word_embeddings=True)
        hf = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
        embeddings = (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
        for weight in {id(w): w for w in embeddings}.values():  # once if tied
            weight.mul_(40)
    hf.save_pretrained(folder)
    if family == "gpt2":
        tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    else:
        (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        specials = {"llama": {"bos_token": "<s>", "eos_token": "</s>"}, "qwen3": {"eos_token": "<|im_end|>"}}[family]
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {family: make_folder(family, root / family) for family in FAMILIES}


def fit_args(folder: Path, corpus: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(FINETUNE), "--model.init_from", str(folder), "--data.path", str(corpus), "--model.block_size", "32",
            "--data.batch_size", "4", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1", "--trainer.precision", "32-true",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]",
            "--trainer.logger.init_args.experiment_name", "ft", *extra]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(family, folders, capsys):
    folder = folders[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
    generator = TextGenerator.load(folder)
    assert generator.encode_prompt(PROMPT).tolist() == prompt[0].tolist()  # the folder's tokenizer, BOS included
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=hf.config.eos_token_id)[0, prompt.shape[1]:]
    ours = torch.stack(list(generate_tokens(generator.model, prompt[0], 24, 1, lambda logits: logits.argmax(-1))))[:, 0]
    assert ours[: len(expected)].tolist() == expected.tolist()

    code = run_main("generate", "--ckpt_path", str(folder), "--prompt", PROMPT, "--max_new_tokens", "24", "--num_samples", "2",
                    "--temperature", "0", "--valid_utf8", "false")
    out = capsys.readouterr().out
    assert code == 0
    text = hf_tokenizer.decode(torch.cat([prompt[0], expected]), skip_special_tokens=True)
    assert out.count(text + "\n") == 2, out


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tune_starts_from_the_folder_and_exports_its_family(family, folders, tmp_path, mlflow_store):
    folder = folders[family]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    with single_thread():
        assert run_main(*fit_args(folder, corpus)) == 0

    # The first training loss is the folder's model's loss on the first batch (not a fresh model's: ~5.7).
    data = TextDataModule(path=str(corpus), tokenizer_path=str(folder), block_size=32, batch_size=4)
    data.prepare_data()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    client = MlflowClient(mlflow_store)
    run = only_run(client, "ft")
    first = metric_history(client, run.info.run_id, "train/loss")[0]
    assert first[0] == 0 and first[1] == pytest.approx(expected, abs=1e-4) and expected > 8
    if family == "llama":  # a document starts with the tokenizer's <s> and ends with its </s>
        train = data.tokens["train"]
        assert train[0:1].tolist() == [0] and train[len(train) - 1 : len(train)].tolist() == [1]
    assert run.data.tags["init_from.family"] == family and run.data.tags["init_from"] == str(folder.resolve())
    assert run.data.params["model.n_layer"] == "2" and run.data.params["data.tokenizer_path"] == str(folder)

    # Export writes the same family back, the folder's tokenizer, and our logits.
    (checkpoint,) = Path("runs").glob("*/*/checkpoints/last.ckpt")
    assert run_main("export", "--ckpt_path", str(checkpoint), "--out", "exported") == 0
    assert json.loads(Path("exported/config.json").read_text())["model_type"] == family
    assert Path("exported/tokenizer.json").read_text(encoding="utf-8") == folder_tokenizer(folder).to_str()
    model, _ = load_gpt(checkpoint)
    exported = transformers.AutoModelForCausalLM.from_pretrained("exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(batch[:, :-1]).logits, model(batch[:, :-1]), rtol=0, atol=1e-4)

    # A .ckpt of ours starts a new run as well (step 0, fresh optimizer).
    if family == "gpt2":
        with single_thread():
            assert run_main(*fit_args(checkpoint, corpus, "--trainer.logger.init_args.experiment_name", "ft2")) == 0
        again = only_run(client, "ft2")
        assert again.data.tags["init_from.kind"] == "checkpoint"
        assert metric_history(client, again.info.run_id, "train/loss")[0][0] == 0


def test_shape_flags_that_contradict_the_folder_are_refused(folders, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    assert run_main(*fit_args(folders["llama"], corpus, "--model.n_layer", "3", "--model.block_size", "128")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.block_size=128 but" in err and "model.n_layer=3 but" in err and "has n_layer=2" in err and "\n" not in err
    assert not any((tmp_path / name).exists() for name in ("mlflow.db", "runs", "cache"))


def test_a_block_size_equal_to_the_default_is_still_the_users(folders, tmp_path, mlflow_store):
    """--model.block_size 256 (GPTConfig's default) on a folder of 1024 positions trains 256-token windows."""
    import shutil

    folder = tmp_path / "llama-1024"
    shutil.copytree(folders["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    args = fit_args(folder, corpus, "--model.block_size", "256", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1")
    with single_thread():
        assert run_main(*args) == 0
    params = only_run(MlflowClient(mlflow_store), "ft").data.params
    assert params["model.block_size"] == params["data.block_size"] == "256"


def test_each_file_of_a_source_is_read_once(folders, tmp_path, monkeypatch):
    """load_source, then what fit's data module asks of the same folder (its tokenizer, its chat template)."""
    import pathlib
    import shutil

    from lm_lightning.chat_template import source_template
    from lm_lightning.checkpoint import tokenizer_of
    from lm_lightning.pretrained import load_source

    folder = shutil.copytree(folders["qwen3"], tmp_path / "qwen3")  # files this process has not read
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages[0]['content'] }}"}))
    reads: list[str] = []
    read_text = pathlib.Path.read_text
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: reads.append(self.relative_to(folder).name if self.is_relative_to(folder) else "") or read_text(self, *a, **k))
    _, tokenizer, info = load_source(folder)
    assert tokenizer_of(folder).to_str() == tokenizer.to_str()
    assert source_template(str(folder)).source == info.chat_template.source == "{{ messages[0]['content'] }}"
    assert sorted(filter(None, reads)) == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


class Weights(dict):
    """Not a plain container: unpickling it runs this module's code."""


def break_folder(folder: Path, how: str) -> str:
    """Spoil a copy of a model folder in one way; return what the one-line error must say."""
    config = json.loads((folder / "config.json").read_text())
    if how == "no-config":
        (folder / "config.json").unlink()
        return "has no config.json"
    if how == "model-type":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
        return "model_type='phi3' is not supported; supported: gpt2, llama, mistral, qwen2, qwen3, gemma3_text, smollm3, olmo2"
    if how == "weights-do-not-fit":
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
        return "its weights do not fit its config.json"
    if how == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
        return "has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt"
    if how == "tokenizer-too-big":
        (folder / "tokenizer.json").write_text(train_tokenizer([TEXT], 400).to_str())
        return "its tokenizer has 400 tokens but the model's embedding has 300 rows"
    if how == "not-byte-level":  # sentencepiece-style: ▁ for spaces
        sentencepiece = SentencePieceBPETokenizer()
        sentencepiece.train_from_iterator([TEXT], vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
        (folder / "tokenizer.json").write_text(sentencepiece.to_str())
        return "the tokenizer is not byte-level"
    if how == "pickled-bin":
        (folder / "model.safetensors").unlink()
        torch.save(Weights(w=torch.zeros(1)), folder / "pytorch_model.bin")
        return "pytorch_model.bin: it holds objects that need pickle to load"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["no-config", "model-type", "weights-do-not-fit", "no-tokenizer", "tokenizer-too-big", "not-byte-level", "pickled-bin"]
)
def test_bad_folders_are_one_line_and_nothing_is_written(how, folders, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(folders["llama"], tmp_path / "model")
    message = break_folder(folder, how)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    for args in (fit_args(folder, corpus), ["generate", "--ckpt_path", str(folder), "--prompt", "a"]):
        assert run_main(*args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not any((tmp_path / name).exists() for name in ("mlflow.db", "runs", "cache", "mlruns"))


def test_a_plain_pytorch_model_bin_loads(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = shutil.copytree(folders["gpt2"], tmp_path / "model")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    ids = torch.arange(10)[None]
    reference = TextGenerator.load(folders["gpt2"]).model
    with torch.no_grad():
        torch.testing.assert_close(TextGenerator.load(folder).model(ids), reference(ids), rtol=0, atol=0)
