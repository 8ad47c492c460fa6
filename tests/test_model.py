import pytest
import torch

from lm_lightning.model import GPT, GPTConfig, KVCache

CONFIG = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def test_logits_shape_and_tied_head(model):
    logits = model(torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_causality_changing_token_t_never_changes_earlier_logits(model):
    idx = torch.randint(0, 97, (1, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_parameter_count_matches_gpt2_formula(model):
    C, V, T, L = 32, 97, 16, 2
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + T * C + L * per_block + 2 * C
    assert model.num_params(non_embedding=True) == model.num_params() - T * C


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    big = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=8, n_head=4, n_embd=256))
    proj = big.transformer.h[0].attn.c_proj.weight.std().item()
    fc = big.transformer.h[0].mlp.c_fc.weight.std().item()
    assert proj == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 * 8)
    assert fc == pytest.approx(0.02, rel=0.1)


def test_kv_cache_gives_the_same_logits_as_full_recomputation(model):
    idx = torch.randint(0, 97, (2, 12))
    full = model(idx)
    cache = KVCache(CONFIG, batch_size=2, max_len=16, device=idx.device, dtype=torch.float32)
    prefill = model(idx[:, :5], cache)  # prompt at once
    chunk = model(idx[:, 5:8], cache)  # a chunk on top of a non-empty cache
    steps = [model(idx[:, t : t + 1], cache) for t in range(8, 12)]  # then one token at a time
    torch.testing.assert_close(torch.cat([prefill, chunk, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "not divisible by n_head"),
        (dict(n_layer=0), "n_layer=0 must be a positive integer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_shapes_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


@pytest.mark.parametrize("family", [{}, dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, qk_norm=True)],
                         ids=["gpt2", "modern"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, **family)).train()
    idx = torch.randint(0, 97, (2, 16))
    model(idx).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx).sum().backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
