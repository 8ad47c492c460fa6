"""Low-rank adapters (LoRA, Hu et al. 2021) on the blocks' linear layers of a ``GPT``.

A targeted ``nn.Linear`` is replaced by a :class:`LoRALinear` that keeps the base's ``weight`` and ``bias``
(the same parameters, under the same names, frozen) and adds ``lora_A`` (r x in) and ``lora_B`` (out x r, zero at
the start): ``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``. The state dict keeps every base name, so a
checkpoint of a LoRA run stores only the ``lora_`` tensors and fills the base back in from its source.

Targets (``model.lora_targets``), by our layer names (see model.py):

- ``attention``: ``attn.c_attn`` (the fused query/key/value projection) and ``attn.c_proj`` (the output one);
- ``mlp``: ``mlp.c_fc`` (the fused gate/up projection of gated MLPs, the up projection otherwise) and ``mlp.c_proj``;
- ``all``: both.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lm_lightning.checkpoint import TOKENIZER_KEY, CheckpointError, load_checkpoint, load_gpt, model_config
from lm_lightning.errors import ConfigError
from lm_lightning.export import ExportError, load_pretrained
from lm_lightning.families import weight_map
from lm_lightning.model import GPT, skip_init
from lm_lightning.tokenizer import tokenizer_from_str

TARGETS = {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
TARGETS["all"] = TARGETS["attention"] + TARGETS["mlp"]
LORA_KEY = "lora_base"
"""The checkpoint key of a LoRA run: ``{"path": base source, "sha256": its content hash}``."""
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, base_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().to(base_dtype), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(base_dtype), requires_grad=False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's initialisation; B = 0 keeps the base's output
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return y + update  # a bf16 base and fp32 adapters add in fp32 (outside autocast)

    def delta(self) -> torch.Tensor:
        """The update ``(alpha / r) B A`` to add to ``weight``, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def check_lora(r: int, targets: Iterable[str], init_from: str | None, base_dtype: str) -> None:
    """Refuse LoRA settings that cannot work, with one line."""
    if r < 0:
        raise ConfigError(f"model.lora_r={r} must be >= 0 (0: full fine-tuning; e.g. 8 or 16 for adapters)")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"model.lora_targets: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(TARGETS)}")
    if r and not init_from:
        raise ConfigError("model.lora_r > 0 trains adapters on a pretrained model: set model.init_from (a folder or a .ckpt)")
    if base_dtype not in BASE_DTYPES:
        raise ConfigError(f"model.base_dtype={base_dtype!r} is not a choice; choose one of {', '.join(BASE_DTYPES)}")
    if base_dtype != "float32" and not r:
        raise ConfigError("model.base_dtype holds frozen base weights of a LoRA run: set model.lora_r > 0, or leave it float32")


def apply_lora(model: GPT, r: int, alpha: float, dropout: float, targets: Iterable[str], base_dtype: str = "float32") -> GPT:
    """Freeze every weight of ``model`` and put adapters on the ``targets`` layers, in place."""
    suffixes = tuple(s for t in targets for s in TARGETS[t])
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(suffixes):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, LoRALinear(module, r, alpha, dropout, BASE_DTYPES[base_dtype]))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged(model: GPT) -> GPT:
    """A plain ``GPT`` (fp32) with each adapter folded into its layer's weight: what export and MLflow write."""
    state = {k: v.float() for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, layer in lora_layers(model).items():
        state[f"{name}.weight"] = state[f"{name}.weight"] + layer.delta().to(state[f"{name}.weight"].device)
    with skip_init():
        plain = GPT(model.config)
    plain.load_state_dict(state)
    return plain.train(model.training)


def is_adapter_key(key: str) -> bool:
    return ".lora_" in key


def source_hash(path: str | Path) -> str:
    """SHA-256 of a source's weight and config files (a folder) or of the file (a ``.ckpt``): a changed base differs."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".json") and f.is_file()
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def check_base(base: dict[str, str], checkpoint_path: str | Path) -> None:
    """Refuse, in one line, a LoRA checkpoint whose base moved or changed since the run."""
    path = Path(base["path"])
    if not path.exists():
        raise CheckpointError(
            f"the base model of LoRA checkpoint {checkpoint_path}, {path}, does not exist; put it back at that path"
        )
    if source_hash(path) != base["sha256"]:
        raise CheckpointError(
            f"the base model of LoRA checkpoint {checkpoint_path}, {path}, changed since the run (its content hash "
            "differs); restore the base it was trained on"
        )


def adapted_model(checkpoint: dict[str, Any], path: str | Path) -> tuple[GPT, Tokenizer, str]:
    """The model with its adapters (fp32, eval mode), the tokenizer and the base path of a LoRA run's checkpoint
    ``checkpoint`` (read from ``path``), its base found and checked (:func:`check_base`)."""
    base = checkpoint[LORA_KEY]
    check_base(base, path)
    hp = checkpoint["hyper_parameters"]
    source = Path(base["path"])
    base_model = load_gpt(source)[0] if source.suffix == ".ckpt" else load_pretrained(source)[0]
    config = model_config(hp)
    with skip_init():
        model = GPT(config)
    state = base_model.state_dict()
    if "transformer.wpe.weight" in state:  # a run with a smaller block_size reads the first rows
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: config.block_size]
    model.load_state_dict(state)
    apply_lora(model, hp["lora_r"], hp["lora_alpha"], 0.0, hp["lora_targets"])
    adapters = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.") and is_adapter_key(k)}
    model.load_state_dict(model.state_dict() | adapters)
    return model.eval(), tokenizer_from_str(checkpoint[TOKENIZER_KEY], source=str(path)), str(source)


def load_lora_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> tuple[GPT, Tokenizer, str]:
    """:func:`adapted_model` with the adapters merged into the weights: what generation, evaluation and export use."""
    model, tokenizer, base = adapted_model(checkpoint, path)
    return merged(model).eval(), tokenizer, base


def export_adapter(ckpt_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a LoRA run's adapters as a PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``) for its
    base, named as the base's transformers family names its modules: a fused projection (qkv, gate/up) becomes one
    adapter per part, each with the shared ``A`` and its rows of ``B`` (the same update, exactly)."""
    checkpoint = load_checkpoint(ckpt_path)
    if LORA_KEY not in checkpoint:
        raise ExportError(f"{ckpt_path} is not a checkpoint of a LoRA run (model.lora_r > 0); export it without --adapter")
    model, _, base = adapted_model(checkpoint, ckpt_path)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    entries = {e.ours: e for e in weight_map(model.config)}
    tensors, modules, fan_in_fan_out = {}, [], False
    for name, layer in lora_layers(model).items():
        entry = entries[f"{name}.weight"]
        rows = layer.lora_B.split(list(entry.split)) if entry.split else (layer.lora_B,)
        for theirs, b in zip(entry.theirs, rows):
            module = theirs.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = layer.lora_A.detach().clone()  # one copy per part: safetensors refuses shared storage
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().clone()
            modules.append(module)
        fan_in_fan_out |= entry.transpose  # GPT-2's Conv1D stores W transposed; A and B keep their shapes
    hp = checkpoint["hyper_parameters"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": hp["lora_r"],
        "lora_alpha": hp["lora_alpha"], "lora_dropout": hp["lora_dropout"], "target_modules": modules,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "modules_to_save": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
