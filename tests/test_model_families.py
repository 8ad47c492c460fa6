"""Model families: GPT-2 (the defaults) and the modern one (RoPE, RMSNorm, SwiGLU, grouped-query
attention, QK-norm). Generation through the KV cache against recomputation, export to and loading
from transformers GPT-2 / Llama / Qwen3 folders with equal logits, and what is refused."""

import dataclasses
import json

import pytest
import torch

from lm_lightning.export import ExportError, export_pretrained, load_model, load_pretrained
from lm_lightning.families import family_of
from lm_lightning.tokenizer import TokenizerError
from lm_lightning.generate import generate_tokens
from lm_lightning.model import GPT, GPTConfig, KVCache
from lm_lightning.tokenizer import train_tokenizer
from tests.conftest import CHINESE

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread", "transformers_offline")

SHAPE = dict(block_size=16, n_layer=2, n_head=4, n_embd=32)
MODERN = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, qk_norm=True)
LLAMA = {**MODERN, "qk_norm": False}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([CHINESE * 4, "The quick brown fox jumps over the lazy dog. " * 20], 300)


def tiny(vocab_size: int = 97, seed: int = 0, **kwargs) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, **{**SHAPE, **kwargs})).eval()


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1 (and biases at 0), which would hide a mixed-up norm in a comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or p.dim() == 1:
                p.uniform_(0.5, 1.5)


# --- generation through the KV cache -------------------------------------------------------------


def greedy_reference(model: GPT, prompt: torch.Tensor, max_new_tokens: int, num_samples: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the context for every token. The context is what
    generate_tokens' cache holds: everything until the window is full, then its last 3/4 again at
    positions from 0."""
    block_size = model.config.block_size
    window, keep = min(block_size, len(prompt) + max_new_tokens), max(1, block_size * 3 // 4)
    ids, start, out = prompt[None].repeat(num_samples, 1), 0, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(ids[:, start:])[:, -1].argmax(-1)
            ids = torch.cat([ids, token[:, None]], dim=1)
            out.append(token)
            if ids.shape[1] - 1 - start == window:  # the cache was full: refill with the last 3/4
                start = ids.shape[1] - keep
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("family", [{}, MODERN, {**MODERN, "n_kv_head": 1, "tie_embeddings": False, "logit_softcap": 10.0}])
@pytest.mark.parametrize("prompt_len, max_new_tokens", [(5, 11), (3, 40)])  # within the window; 2.5 windows past it
def test_greedy_with_kv_cache_matches_recomputation(family, prompt_len, max_new_tokens):
    model = tiny(**family)
    randomize_norms(model)
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(1))
    cached = torch.stack(list(generate_tokens(model, prompt, max_new_tokens, 2, lambda logits: logits.argmax(-1))), dim=1)
    torch.testing.assert_close(cached, greedy_reference(model, prompt, max_new_tokens, 2), rtol=0, atol=0)


def test_kv_cache_holds_n_kv_head_heads_and_matches_full_logits():
    model = tiny(**MODERN)
    cache = KVCache(model.config, batch_size=2, max_len=16, device=torch.device("cpu"), dtype=torch.float32)
    assert cache.keys.shape == (2, 2, 2, 16, 8)  # layers, batch, n_kv_head (not n_head), positions, head_dim
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        steps = [model(idx[:, :5], cache), model(idx[:, 5:8], cache)] + [model(idx[:, t : t + 1], cache) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(idx), rtol=1e-5, atol=1e-5)


# --- the model's fields ----------------------------------------------------------------------------


def test_default_gpt2_state_dict_keys_are_unchanged():
    layer = [
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
        "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    ]
    expected = ["transformer.wte.weight", "transformer.wpe.weight"]
    expected += [f"transformer.h.{i}.{name}" for i in range(2) for name in layer]
    expected += ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    model = tiny()
    assert list(model.state_dict()) == expected
    assert model.lm_head.weight is model.transformer.wte.weight


def test_modern_parameter_count_and_flops():
    model = tiny(**MODERN, tie_embeddings=False)
    C, V, L, D, KV, F = 32, 97, 2, 8, 2, 128  # SwiGLU width: 8/3 * 32 = 85.3, rounded up to a multiple of 64
    assert model.config.mlp_width == F
    per_block = 2 * C + C * (C + 2 * KV * D) + C * C + 2 * D + C * 2 * F + F * C
    assert model.num_params() == 2 * V * C + L * per_block + C
    assert model.num_params(non_embedding=True) == model.num_params() - V * C  # the untied input table is a lookup
    assert model.flops_per_token(16) == 6 * model.num_params(non_embedding=True) + 12 * L * C * 16


def test_zero_init_projections_start_every_block_as_the_identity():
    model = tiny(**MODERN, tie_embeddings=False, zero_init_proj=True)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert not p.any(), name
    assert not model(torch.randint(0, 97, (1, 8))).any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pos_embedding="alibi"), "pos_embedding='alibi' is not a choice; choose one of learned, rope"),
        (dict(norm="batchnorm"), "norm='batchnorm' is not a choice"),
        (dict(mlp="reglu"), "mlp='reglu' is not a choice; choose one of gelu, swiglu, geglu, relu2"),
        (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
        (dict(n_embd=36, n_head=4, pos_embedding="rope"), "pos_embedding=rope needs an even head size"),
        (dict(logit_softcap=0.0), "logit_softcap=0.0 must be positive"),
        (dict(mlp_hidden=0), "mlp_hidden=0 must be a positive integer"),
    ],
)
def test_bad_fields_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        GPTConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_model_needs_a_vocabulary_size():
    with pytest.raises(ValueError, match="vocab_size is unset"):
        GPT(GPTConfig())


# --- export to transformers ------------------------------------------------------------------------


def resolved(config: GPTConfig) -> GPTConfig:
    """``config`` with its unset widths filled in, as a transformers config.json states them, and the family it
    exports to recorded."""
    return dataclasses.replace(config, mlp_hidden=config.mlp_width, n_kv_head=config.kv_heads, family=family_of(config).model_type)


def assert_same_logits(hf_model, model: GPT, vocab_size: int) -> None:
    ids = torch.randint(0, vocab_size, (2, model.config.block_size), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "family, model_type",
    [
        ({}, "gpt2"),
        ({"tie_embeddings": False, "mlp_hidden": 48, "norm_eps": 1e-6}, "gpt2"),
        (LLAMA, "llama"),
        ({**LLAMA, "tie_embeddings": False, "n_kv_head": 1, "rope_theta": 500.0}, "llama"),
        ({**LLAMA, "bias": True, "n_kv_head": None}, "llama"),
        (MODERN, "qwen3"),
        ({**MODERN, "tie_embeddings": False}, "qwen3"),
    ],
)
def test_export_gives_transformers_our_logits(family, model_type, tokenizer, tmp_path):
    vocab = tokenizer.get_vocab_size()
    model = tiny(vocab, **family)
    randomize_norms(model)
    export_pretrained(model, tokenizer, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.model_type == model_type
    assert_same_logits(hf, model, vocab)
    back, back_tokenizer = load_pretrained(tmp_path / "out")
    assert resolved(back.config) == resolved(model.config) and back_tokenizer.to_str() == tokenizer.to_str()
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({**LLAMA, "mlp": "relu2"}, "mlp='relu2' has no transformers class"),
        ({**MODERN, "logit_softcap": 15.0}, "logit_softcap=15.0 has no transformers class"),
        ({"norm": "rmsnorm"}, "norm='rmsnorm' has no transformers class in family gpt2: GPT2LMHeadModel needs norm='layernorm'"),
        ({"n_kv_head": 2}, "n_kv_head=2 has no transformers class"),
        ({**LLAMA, "norm": "layernorm"}, "norm='layernorm' has no transformers class in family llama"),
        ({**MODERN, "bias": True}, "mlp_bias=True has no transformers class .* Qwen3ForCausalLM needs mlp_bias=False"),
    ],
)
def test_export_refuses_what_transformers_has_no_class_for(kwargs, message, tokenizer, tmp_path):
    with pytest.raises(ExportError, match=message) as error:
        export_pretrained(tiny(tokenizer.get_vocab_size(), **kwargs), tokenizer, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


# --- loading transformers folders ------------------------------------------------------------------

HF_SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, rms_norm_eps=1e-6, head_dim=8)


def hf_models():
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4)),
        "gpt2-untied": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=40, tie_word_embeddings=False)
        ),
        "llama-gqa-tied": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**HF_SHAPE, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=5000.0)
        ),
        "llama-untied-bias": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**HF_SHAPE, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
        ),
        "qwen3-mqa": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_SHAPE, num_key_value_heads=1)),
    }


@pytest.mark.parametrize("name", list(hf_models()))
@pytest.mark.parametrize("sharded", [False, True])
def test_load_pretrained_reads_transformers_folders(name, sharded, tmp_path):
    torch.manual_seed(0)
    hf = hf_models()[name]().eval()
    randomize_norms(hf)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    model = load_model(tmp_path)  # the weights alone: this tokenizer has more tokens than the model (tests/test_pretrained.py)
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    assert_same_logits(hf, model, 97)


def save_llama(folder, **overrides) -> None:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SHAPE)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_type": "phi3"}, "model_type='phi3' is not supported; supported: gpt2, llama, mistral, qwen2, qwen3"),
        ({"rope_parameters": {"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0], "rope_theta": 1e4}},
         "rope_parameters rope_type='longrope' is not supported; supported: default, linear, llama3, yarn"),
        ({"num_local_experts": 8}, r"num_local_experts=8 \(mixture-of-experts\) is not supported"),
        ({"vision_config": {"hidden_size": 8}}, r"vision_config={...} \(a vision tower\) is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported; supported: 'silu'"),
        ({"num_key_value_heads": 3}, "n_head=4 is not divisible by n_kv_head=3"),
        ({"intermediate_size": 40}, "its weights do not fit its config.json"),
    ],
)
def test_load_refuses_what_our_model_cannot_express(overrides, message, tmp_path):
    save_llama(tmp_path, **overrides)
    with pytest.raises(ExportError, match=message) as error:
        load_model(tmp_path)
    assert "\n" not in str(error.value)


def test_load_pretrained_needs_a_tokenizer(tmp_path):
    save_llama(tmp_path)
    with pytest.raises(TokenizerError, match="has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt"):
        load_pretrained(tmp_path)


def test_rmsnorm_under_cpu_autocast_normalises_in_float32_without_a_warning():
    import warnings

    from lm_lightning.model import RMSNorm

    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(2, 3, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it cannot use its fused kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x.float(), (16,), norm.weight, 1e-6).bfloat16())
