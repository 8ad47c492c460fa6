"""The output head's cross-entropy a slice at a time: the same loss and gradients as the plain one, no whole logits."""

import pytest
import torch
import torch.nn.functional as F

from lm_lightning import head_loss
from lm_lightning.head_loss import head_cross_entropy
from lm_lightning.model import GPT, GPTConfig


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(head_loss, "SLICE_ELEMENTS", 500)  # 4 rows of 101 logits per slice: 10 slices and a partial one


def plain(hidden, weight, targets, target_weights, softcap):
    logits = F.linear(hidden, weight).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return (losses * target_weights).sum(), losses


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_the_loss_and_its_gradients_are_the_plain_ones(small_slices, softcap, masked):
    torch.manual_seed(0)
    n, width, vocab = 43, 16, 101
    hidden = torch.randn(n, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    kept = (torch.rand(n) > 0.4).float() if masked else torch.ones(n)
    target_weights = kept / kept.sum()
    results = []
    for loss_fn in (head_cross_entropy, plain):
        loss, losses = loss_fn(hidden, weight, targets, target_weights, softcap)
        (3 * loss).backward()  # a scale on the way back reaches both gradients
        results.append((loss.detach(), losses.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_the_default_weights_give_the_mean_and_a_frozen_head_gets_no_gradient(small_slices):
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(101, 8)
    targets = torch.randint(0, 101, (9,))
    loss, losses = head_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets))
    loss.backward()
    assert weight.grad is None and hidden.grad is not None and not losses.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(hidden, weight, targets)[1], losses)


def test_the_model_trains_on_the_same_loss_as_its_logits_give(small_slices):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32, logit_softcap=15.0))
    ids = torch.randint(0, 101, (3, 17))
    loss, _ = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids[:, :-1])
    reference = F.cross_entropy(logits.reshape(-1, 101), ids[:, 1:].reshape(-1))
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for name, p in model.named_parameters():  # the tied embedding too: its lookup's and the head's gradients add up
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_tensor_of_the_whole_batchs_logits_is_kept_for_backward():
    torch.manual_seed(0)
    vocab, n = 4096, 2 * 64
    model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))
    assert head_loss.slice_rows(vocab, 32) >= n  # one slice: what is kept, not the slicing, is under test
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    ids = torch.randint(0, vocab, (2, 65))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], targets=ids[:, 1:])[0].backward()
    assert max(sizes) < n * vocab  # the largest is the head's gradient, vocab x n_embd
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(ids[:, :-1]).reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()
    assert max(sizes) >= n * vocab  # the plain way keeps them


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="CPU bf16 autocast needs oneDNN")
def test_under_bf16_autocast_the_loss_is_the_plain_ones(small_slices):
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 32, requires_grad=True), torch.randn(101, 32, requires_grad=True)
    targets = torch.randint(0, 101, (20,))
    results = []
    for loss_fn in (head_cross_entropy, plain):
        with torch.autocast("cpu", torch.bfloat16):
            loss, _ = loss_fn(hidden, weight, targets, torch.full((20,), 1 / 20), None)
        loss.backward()
        assert hidden.grad.dtype == weight.grad.dtype == torch.float32
        results.append((loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)


def test_a_slice_has_the_heads_size_in_logits_within_its_bounds():
    assert head_loss.slice_rows(8192, 128) == 128  # the speedrun's head: 4 MB of logits a slice, in cache
    assert head_loss.slice_rows(1024, 256) == 1024  # a small vocabulary: at least CACHED_SLICE_ELEMENTS logits
    assert head_loss.slice_rows(50257, 768) == 2**24 // 50257  # GPT-2's head: at most SLICE_ELEMENTS
    assert head_loss.slice_rows(2**25, 64) == 1
