"""The optimizer choice: AdamW, or Muon for the blocks' matrices with AdamW for the rest, as one
optimizer that a scheduler drives and a checkpoint restores exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lm_lightning.model import GPT, GPTConfig
from lm_lightning.optim import MuonAdamW, build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
MODERN = dict(pos_embedding="rope", norm="rmsnorm", mlp="relu2", bias=False, qk_norm=True, tie_embeddings=False, zero_init_proj=True)


def setup(optimizer: str, **family) -> tuple[GPT, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, **family))
    opt = build_optimizer(model, optimizer, learning_rate=3e-3, muon_lr=0.02, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 5))


def batches(n: int) -> torch.Tensor:
    """Sequences that count up from a random start."""
    starts = torch.randint(0, 64, (n, 8, 1), generator=torch.Generator().manual_seed(1))
    return (starts + torch.arange(17)) % 64


def train(model: GPT, opt: torch.optim.Optimizer, scheduler, data: torch.Tensor) -> list[float]:
    """Steps as Lightning's automatic optimization takes them: step(closure), then the scheduler."""
    losses = []
    for batch in data:

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
        scheduler.step()
    return losses


@pytest.mark.parametrize("optimizer, family", [("adamw", {}), ("muon", {}), ("muon", MODERN)])
def test_resume_from_a_state_dict_gives_the_same_losses(optimizer, family):
    data = batches(16)
    uninterrupted = train(*setup(optimizer, **family), data)
    model, opt, scheduler = setup(optimizer, **family)
    first = train(model, opt, scheduler, data[:8])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "scheduler": scheduler.state_dict()})
    model, opt, scheduler = setup(optimizer, **family)  # a fresh process, as a resumed run
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    scheduler.load_state_dict(saved["scheduler"])
    assert first + train(model, opt, scheduler, data[8:]) == uninterrupted  # exactly, on CPU in fp32


def repeats(n: int) -> torch.Tensor:
    """Random 4-token patterns repeated: predicting a token needs attention to the one 4 back."""
    pattern = torch.randint(0, 64, (n, 8, 4), generator=torch.Generator().manual_seed(1))
    return pattern.repeat(1, 1, 5)[:, :, :17]


@pytest.mark.parametrize("family", [{}, MODERN])
def test_muon_trains_the_blocks(family):
    """The blocks learn through Muon alone: with muon_lr=0 they stay as initialised and the loss stays near chance."""
    first, final = {}, {}
    for muon_lr in (0.02, 0.0):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**CONFIG, **family))
        opt = build_optimizer(model, "muon", learning_rate=3e-3, muon_lr=muon_lr)
        losses = train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), repeats(60))
        first[muon_lr], final[muon_lr] = losses[0], sum(losses[-10:]) / 10
    assert final[0.02] < first[0.02] - 0.2 and final[0.02] < final[0.0] - 0.15


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model, opt, scheduler = setup("muon", **MODERN)
    assert isinstance(opt, MuonAdamW) and opt.param_groups[2] is opt.muon.param_groups[0]
    names = {id(p): name for name, p in model.named_parameters()}
    decay, no_decay, muon = ([names[id(p)] for p in group["params"]] for group in opt.param_groups)
    assert sorted(muon) == sorted(
        f"transformer.h.{i}.{layer}.weight" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert decay == ["lm_head.weight"]
    assert "transformer.wte.weight" in no_decay and "transformer.h.0.attn.q_norm.weight" in no_decay
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3 / 5, 3e-3 / 5, 0.02 / 5])  # warm-up scales every group
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]


def test_adamw_decays_matrices_only():
    model, opt, _ = setup("adamw")
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.dim() == 2 and "wte" not in name and "wpe" not in name), name


def test_muon_refuses_a_matrix_that_is_not_2d():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    layer = model.transformer.h[1].mlp.c_fc
    layer.weight = torch.nn.Parameter(layer.weight.detach().flatten())  # as FSDP's flattened parameters
    with pytest.raises(ValueError, match=r"optimizer=muon needs whole 2-D matrices, but transformer.h.1.mlp.c_fc.weight has shape \(4096,\)"):
        build_optimizer(model, "muon")


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer='sgd' is not a choice; choose one of adamw, muon"):
        build_optimizer(GPT(GPTConfig(**CONFIG)), "sgd")


def test_batched_muon_step_is_torchs_muon():
    """muon_step orthogonalises matrices of one shape together; the update is torch.optim.Muon's (to bf16's
    rounding), step after step, for wide, tall and square matrices."""
    from lm_lightning.optim import muon_step

    torch.manual_seed(0)
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128), (96, 32), (32, 32)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    mine = torch.optim.Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)  # groups and state only
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        reference.step()
        muon_step(mine.param_groups[0], mine.state)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    assert set(mine.state[ours[0]]) == {"momentum_buffer"}  # the state a checkpoint of torch's Muon holds
