"""Every model family against transformers itself: a tiny random model of each, built with transformers' own config
and model classes and the real model's feature flags, saved with ``save_pretrained``. For each: our logits within
1e-4 of transformers', greedy generation token for token equal to transformers' ``generate`` (past the sliding
window where there is one), and an export that writes the same family back with our logits."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import CHINESE, english_text, run_main, single_thread
from lm_lightning.checkpoint import load_checkpoint, load_gpt
from lm_lightning.export import export_pretrained, load_model
from lm_lightning.families import FAMILIES, config_from_hf, hf_config, state_from_hf, weight_map
from lm_lightning.generate import TextGenerator, generate_tokens
from lm_lightning.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("transformers_offline")

TEXT = english_text(6_000) + "\n" + CHINESE * 4
WINDOW = 8  # the sliding window of the families that have one: generation goes 3x past it
NEW_TOKENS = 24
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500_000.0}  # Llama 3.2's, at a tiny length
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1_000_000.0}


# name -> (model_type, transformers model class, config class, config values): the flags of the real model each is for.
CASES = {
    "gpt2": ("gpt2", "GPT2LMHeadModel", "GPT2Config", dict(n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    # Llama 2 / TinyLlama: plain RoPE, untied head.
    "llama": ("llama", "LlamaForCausalLM", "LlamaConfig", dict(SHAPE, rope_theta=10_000.0)),
    # Llama 3.2 1B/3B: llama3-scaled RoPE, tied head.
    "llama3-tied": ("llama", "LlamaForCausalLM", "LlamaConfig", dict(SHAPE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    # Mistral 7B v0.1: a sliding window on every layer.
    "mistral": ("mistral", "MistralForCausalLM", "MistralConfig", dict(SHAPE, sliding_window=WINDOW)),
    # Qwen2.5 0.5B: biases on q/k/v only, tied head.
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "Qwen2Config", dict(SHAPE, tie_word_embeddings=True)),
    # Qwen3 0.6B / 4B: head_dim 128 with 1024 / 16 and 2560 / 32; here 32 with 64 / 4.
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(SHAPE, head_dim=32, tie_word_embeddings=True)),
    # Qwen3 with its long-context yarn RoPE, and q/k/v/o biases.
    "qwen3-yarn": ("qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(SHAPE, head_dim=16, attention_bias=True, rope_parameters=YARN_ROPE)),
    # Gemma 3 270M / 1B (4B: the full layers' RoPE scaled linearly): sliding and full layers, each with its own base.
    "gemma3_text": ("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        SHAPE, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})),
    # SmolLM3 3B: no RoPE on every fourth layer.
    "smollm3": ("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config", dict(SHAPE, num_hidden_layers=4)),
    # OLMo 2: norms after attention and MLP, QK-norm over the whole width.
    "olmo2": ("olmo2", "Olmo2ForCausalLM", "Olmo2Config", dict(SHAPE)),
}


def build(name: str, vocab: int, eot: int) -> torch.nn.Module:
    _, model_class, config_class, values = CASES[name]
    values = json.loads(json.dumps(values))  # a copy: transformers fills its dicts in
    config = getattr(transformers, config_class)(**values, vocab_size=vocab, bos_token_id=eot, eos_token_id=eot, pad_token_id=None)
    return getattr(transformers, model_class)(config)


def make_tokenizer() -> Tokenizer:
    """One byte-level BPE for every family (as Llama 3 and Qwen have), ~300 tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return make_tokenizer()


def randomize(hf: torch.nn.Module) -> None:
    """Norm weights start at 1 (Gemma's at 0) and biases at 0, which would hide a mixed-up norm or bias; larger
    embeddings make greedy choices clear-cut (no near-ties for float noise to flip)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        embeddings = (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
        for weight in {id(w): w for w in embeddings}.values():  # once if tied
            weight.mul_(10)


def make_folder(name: str, tokenizer: Tokenizer, folder: Path) -> Path:
    """The case ``name`` as a transformers folder: random weights (:func:`randomize`), ``save_pretrained``, and the
    tokenizer with its end-of-text token as the model's end of sequence."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    hf = build(name, tokenizer.get_vocab_size(), eot)
    randomize(hf)
    hf.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    return {name: make_folder(name, tokenizer, root / name) for name in CASES}


@functools.cache
def hf_model(folder: Path):
    """transformers' model of ``folder``, loaded once per folder (tests only read it)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def ids(vocab: int, length: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(3))


def test_every_family_is_registered_and_every_case_covers_one():
    assert set(FAMILIES) == {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3", "olmo2"}
    assert {model_type for model_type, *_ in CASES.values()} == set(FAMILIES)


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_transformers(name, folders):
    hf, model = hf_model(folders[name]), load_model(folders[name])
    assert model.config.family == CASES[name][0]
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        expected, ours = hf(x).logits, model(x)
    assert expected.abs().max() > 1  # not a model whose logits are all ~0
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_equals_transformers_also_past_the_window(name, folders):
    folder = folders[name]
    hf, generator = hf_model(folder), TextGenerator.load(folder)
    prompt = generator.encode_prompt("The quick brown fox")
    assert len(prompt) + NEW_TOKENS > 3 * WINDOW
    with torch.no_grad():
        expected = hf.generate(prompt[None], do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               pad_token_id=hf.config.eos_token_id)[0, len(prompt):]
        ours = torch.cat(list(generate_tokens(generator.model, prompt, NEW_TOKENS, 1, lambda logits: logits.argmax(-1))))
    assert ours.tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["mistral", "gemma3_text"])
def test_generate_command_greedy_equals_transformers(name, folders, capsys):
    """``lm-lightning generate --temperature 0`` prints what transformers' greedy generate decodes to."""
    folder = folders[name]
    hf, generator = hf_model(folder), TextGenerator.load(folder)
    prompt = generator.encode_prompt("The quick brown fox")
    with torch.no_grad():
        expected = hf.generate(prompt[None], do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=hf.config.eos_token_id)[0]
    # Random weights pick tokens whose bytes need not make whole characters; those print as U+FFFD.
    text = b"".join(generator.table[i] for i in expected.tolist()).decode("utf-8", errors="replace")
    assert run_main("generate", "--ckpt_path", str(folder), "--prompt", "The quick brown fox", "--max_new_tokens",
                    str(NEW_TOKENS), "--temperature", "0", "--valid_utf8", "false") == 0
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("name", CASES)
def test_export_writes_the_same_family_with_our_logits(name, folders, tokenizer, tmp_path):
    model = load_model(folders[name])
    export_pretrained(model, tokenizer, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((folders[name] / "config.json").read_text())
    assert written["model_type"] == original["model_type"] and written["architectures"] == original["architectures"]
    hf = hf_model(tmp_path / "out")
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-4)
    back = load_model(tmp_path / "out")
    assert back.config == model.config
    for (key, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_the_kv_cache_past_the_window_equals_recomputation(folders):
    """Each new token through the cache sees what a full forward of the whole sequence lets it see."""
    model = load_model(folders["gemma3_text"])
    x = ids(model.config.vocab_size, 30)
    from lm_lightning.model import KVCache

    cache = KVCache(model.config, 2, 30, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        steps = [model(x[:, :5], cache), model(x[:, 5:12], cache)] + [model(x[:, t : t + 1], cache) for t in range(12, 30)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(x), rtol=0, atol=1e-4)


def test_weight_map_names_every_tensor_once_with_fused_splits(folders):
    config = load_model(folders["qwen3"]).config
    entries = weight_map(config)
    theirs = [name for e in entries for name in e.theirs]
    assert len(theirs) == len(set(theirs)) == len(transformers.AutoModelForCausalLM.from_pretrained(folders["qwen3"]).state_dict()) - 1
    qkv = next(e for e in entries if e.ours == "transformer.h.0.attn.c_attn.weight")
    assert qkv.theirs == tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv") and qkv.split == (128, 64, 64)
    assert next(e for e in weight_map(GPTConfig(vocab_size=8)) if e.ours.endswith("c_fc.weight")).transpose  # GPT-2's Conv1D


def test_state_from_hf_names_a_missing_and_a_leftover_tensor(folders):
    from safetensors.torch import load_file

    config = load_model(folders["mistral"]).config
    weights = load_file(folders["mistral"] / "model.safetensors")
    with pytest.raises(KeyError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        state_from_hf(config, {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(KeyError, match="unexpected tensors: model.extra"):
        state_from_hf(config, {**weights, "model.extra": torch.zeros(1)})


def llama_hf(**rope) -> dict:
    return {"model_type": "llama", "vocab_size": 300, **SHAPE, **rope}


def test_v4_rope_scaling_and_v5_rope_parameters_read_alike():
    v5 = config_from_hf(llama_hf(rope_parameters=dict(LLAMA3_ROPE)))
    v4 = config_from_hf(llama_hf(rope_theta=500_000.0, rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}))
    assert v4 == v5 and v5.rope_theta == 500_000.0 and v5.rope_scaling["rope_type"] == "llama3"
    legacy = config_from_hf(llama_hf(rope_scaling={"type": "linear", "factor": 2.0}))  # 4.x's older key
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0} and legacy.rope_theta == 10_000.0


def test_rope_scaling_and_rope_parameters_that_disagree_warn_and_rope_scaling_wins_as_in_transformers(tmp_path):
    hf = llama_hf(rope_theta=500.0, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 700.0},
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    with pytest.warns(UserWarning, match="rope_scaling .* and rope_parameters .* disagree; rope_scaling is used"):
        ours = config_from_hf(hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    assert ours.rope_scaling == {"rope_type": "linear", "factor": theirs["factor"]} and ours.rope_theta == theirs["rope_theta"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own export writes both, alike: no warning
        config_from_hf(hf_config(ours, 0))


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"model_type": "phi3"}, "model_type='phi3' is not supported"),
        (llama_hf(rope_parameters={"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0], "rope_theta": 1e4}),
         "rope_parameters rope_type='longrope' is not supported"),
        (llama_hf(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type='dynamic' is not supported"),
        ({**llama_hf(), "model_type": "qwen3", "num_experts": 8}, r"num_experts=8 \(mixture-of-experts\) is not supported"),
        ({**llama_hf(), "model_type": "gemma3", "vision_config": {"hidden_size": 8}}, r"vision_config={...} \(a vision tower\)"),
        ({**llama_hf(), "model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        (llama_hf(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
    ],
)
def test_what_cannot_be_expressed_is_one_line_naming_the_field(hf, message):
    with pytest.raises(ValueError, match=message) as error:
        config_from_hf(hf)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "config, message",
    [
        (GPTConfig(vocab_size=8, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, family="mistral", nope_layers=[1]),
         r"nope_layers=\[1\] has no transformers class in family mistral"),
        (GPTConfig(vocab_size=8, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, family="olmo2"),
         "qk_norm=False has no transformers class in family olmo2: Olmo2ForCausalLM needs qk_norm=True"),
        (GPTConfig(vocab_size=8, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, family="qwen2"),
         "qkv_bias=False has no transformers class in family qwen2"),
    ],
)
def test_export_refuses_what_the_recorded_family_cannot_state(config, message, tokenizer, tmp_path):
    from lm_lightning.export import ExportError

    with pytest.raises(ExportError, match=message):
        export_pretrained(GPT(config), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["gemma3_text", "olmo2"])
def test_fit_init_from_trains_and_the_checkpoint_records_the_family(name, folders, tmp_path, mlflow_store):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    finetune = Path(__file__).resolve().parents[1] / "conf" / "finetune.yaml"
    args = ["fit", "--config", str(finetune), "--model.init_from", str(folders[name]), "--data.path", str(corpus),
            "--model.block_size", "32", "--data.batch_size", "4", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--trainer.precision", "32-true", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]
    with single_thread():
        assert run_main(*args) == 0
    (checkpoint,) = Path("runs").glob("*/*/checkpoints/last.ckpt")
    assert load_checkpoint(checkpoint)["hyper_parameters"]["family"] == name
    model, _ = load_gpt(checkpoint)
    assert model.config.family == name and model.config.block_size == 32
    assert run_main("export", "--ckpt_path", str(checkpoint), "--out", "exported") == 0
    assert json.loads(Path("exported/config.json").read_text())["model_type"] == name


# The published config.json values (the keys that shape the model) of the real models each family is for.
PUBLISHED = {
    "Llama-3.2-1B": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "Mistral-7B-v0.1": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                        "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000},
    "Qwen2.5-0.5B": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                     "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 24,
                     "tie_word_embeddings": True, "vocab_size": 151936},
    "Qwen3-0.6B": {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False,
                   "max_window_layers": 28, "tie_word_embeddings": True, "vocab_size": 151936, "attention_bias": False},
    "Qwen3-4B": {"model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000, "use_sliding_window": False, "tie_word_embeddings": True,
                 "vocab_size": 151936},
    "gemma-3-1b-pt": {"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                      "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
                      "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1000000, "rope_local_base_freq": 10000,
                      "rope_scaling": None, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "vocab_size": 262144,
                      "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None, "attn_logit_softcapping": None},
    "SmolLM3-3B": {"model_type": "smollm3", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
                   "rope_theta": 5000000.0, "no_rope_layer_interval": 4, "use_sliding_window": False, "tie_word_embeddings": True,
                   "vocab_size": 128256},
    "OLMo-2-0425-1B": {"model_type": "olmo2", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                       "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                       "rope_theta": 500000, "tie_word_embeddings": False, "vocab_size": 100352},
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_map_onto_the_transformers_model_tensor_for_tensor(name, tmp_path):
    """Each real model's config (no weights: both models are built on the meta device) maps onto a model of ours
    whose every tensor has the shape of the transformers tensors it is made of."""
    hf = PUBLISHED[name]
    config = config_from_hf(hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path)).state_dict()
        ours = GPT(config).state_dict()
    mapped = state_from_hf(config, theirs)  # every tensor of theirs used, none missing
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.items()}


def test_gpt2_files_without_the_base_prefix_and_with_mask_buffers_load(folders, tmp_path):
    """The original GPT-2 files name ``h.0.attn.c_attn.weight`` (no ``transformer.``) and hold each layer's causal
    mask as ``h.0.attn.bias``; transformers loads them, and so do we."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(folders["gpt2"], tmp_path / "gpt2")
    weights = {name.removeprefix("transformer."): t for name, t in load_file(folder / "model.safetensors").items()}
    weights |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    reference = load_model(folders["gpt2"])
    x = ids(reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(x), reference(x), rtol=0, atol=0)
