"""``LanguageModel``: the LightningModule around ``GPT`` — steps, loss, metrics, optimizer, schedule."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import MeanMetric, SumMetric

from lm_lightning.chat_template import CHAT_TEMPLATE_KEY
from lm_lightning.checkpoint import (
    LEGACY_LOSS_WINDOW_KEY,
    SKIPPED_BATCHES_KEY,
    TOKENIZER_KEY,
    check_same_tokenizer,
    check_shape,
    CheckpointError,
)
from lm_lightning.errors import ConfigError, RunError
from lm_lightning.files import cache_root
from lm_lightning.lora import LORA_KEY, apply_lora, check_base, check_lora, is_adapter_key, source_hash
from lm_lightning.model import GPT, GPTConfig
from lm_lightning.optim import build_optimizer, warmup_cosine
from lm_lightning.pretrained import init_model


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite."""


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        optimizer: Literal["adamw", "muon"] = "adamw",
        learning_rate: float = 1e-3,
        muon_lr: float = 0.02,
        muon_weight_decay: float | None = None,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        activation_checkpointing: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        init_from: str | None = None,
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: tuple[str, ...] = ("attention", "mlp"),
        base_dtype: Literal["float32", "bfloat16"] = "float32",
        **model_config,
    ):
        """A GPT trained by next-token prediction.

        Args:
            optimizer: ``adamw`` for every parameter, or ``muon``: Muon (``torch.optim.Muon``) for the blocks'
                weight matrices and AdamW for embeddings, head, norms and biases.
            learning_rate: Peak AdamW learning rate, reached after ``warmup_steps``.
            muon_lr: Peak Muon learning rate (with ``optimizer: muon``); it follows the same schedule.
            muon_weight_decay: Decoupled weight decay of the Muon matrices: each step shrinks them by
                ``muon_lr * muon_weight_decay``. Unset: ``weight_decay``.
            min_lr_ratio: Learning rate at the end of the cosine decay, as a fraction of the peak (0.1: a tenth).
            warmup_steps: Steps of linear warm-up from 0.
            lr_decay_steps: Step at which the cosine decay reaches its end. Unset: the Trainer's total steps.
            weight_decay: AdamW weight decay on matrices (not on biases, norms or embeddings).
            betas: AdamW betas.
            compile: Compile the model with ``torch.compile`` (in place) before training; the compiled
                kernels are cached under ``$LM_LIGHTNING_CACHE/inductor``.
            activation_checkpointing: Recompute each block's activations in the backward pass instead of
                keeping them: ~30% more compute, memory that no longer grows with depth.
            nonfinite_loss: What a NaN or infinite training loss does: ``stop`` training with an error naming the
                step, before the weights are touched (the checkpoints already written stay good); or ``skip`` the
                batch: no update, but the step counts (the schedule moves on), and ``train/skipped_batches`` counts it.
            init_from: Start from this model's weights (a new run: fresh optimizer, step 0): a transformers folder
                (GPT-2, Llama, Qwen3; ``config.json`` and safetensors), a folder from ``lm-lightning export``, or a
                ``.ckpt`` of ours. Its shape and tokenizer are used: leave model.* shape fields unset (a value that
                contradicts it is an error; a smaller block_size is allowed) and data.tokenizer_path unset or the same.
            lora_r: Rank of low-rank adapters (LoRA) trained on a frozen ``init_from`` model; 0: full fine-tuning.
                Checkpoints then hold the adapters and the base's path and content hash, not the base.
            lora_alpha: LoRA scale numerator: the update is ``lora_alpha / lora_r * B A``.
            lora_dropout: Dropout on the adapters' input.
            lora_targets: Layers that get adapters: ``attention`` (fused qkv and output projections), ``mlp``
                (its input and output projections), ``all`` (both). See lm_lightning/lora.py.
            base_dtype: Dtype of the frozen adapted layers' base weights (``bfloat16`` halves their memory);
                the adapters stay fp32.
            model_config: The model's fields (``block_size``, ``n_layer``, ...), declared in ``GPTConfig``.
        """
        super().__init__()
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate={learning_rate} must be positive, e.g. 1e-3")
        if muon_lr <= 0:
            raise ConfigError(f"model.muon_lr={muon_lr} must be positive, e.g. 0.02")
        if not 0 <= min_lr_ratio <= 1:
            raise ConfigError(f"model.min_lr_ratio={min_lr_ratio} must be between 0 and 1 (a fraction of the peak rate)")
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps={warmup_steps} must be >= 0")
        try:  # a bad model is refused now, not after tokenizing
            self.config = GPTConfig(**model_config)
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None
        check_lora(lora_r, lora_targets, init_from, base_dtype)
        self.source = None
        self.lora_base: dict[str, str] | None = None
        if init_from:
            source_model, tokenizer, self.source = init_model(init_from, model_config)
            self.config = source_model.config
            if lora_r:
                apply_lora(source_model, lora_r, lora_alpha, lora_dropout, lora_targets, base_dtype)
                self.lora_base = {"path": self.source.path, "sha256": source_hash(self.source.path)}
        self.save_hyperparameters()
        self.hparams.update(dataclasses.asdict(self.config))  # every model field, defaults included
        self.model: GPT | None = None
        self.val_nats = SumMetric()
        self.val_bytes = SumMetric()
        self.val_tokens = SumMetric()
        # The mean training loss of the logging window in progress; in the checkpoint, so a resumed run logs
        # the same window means. No NaN check: a non-finite loss never reaches it.
        self.train_loss = MeanMetric(nan_strategy="disable", sync_on_compute=False)
        self.train_loss.persistent(True)
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)
        self.tokenizer_json: str | None = None
        self.chat_template: str | None = None
        self.skipped_batches = 0
        if init_from:
            self.model, self.tokenizer_json = source_model, tokenizer.to_str()
            self.model.activation_checkpointing = activation_checkpointing
        elif self.config.vocab_size is not None:
            self._build()

    def _build(self) -> None:
        self.model = GPT(self.config)
        self.model.activation_checkpointing = self.hparams.activation_checkpointing

    # --- wiring to the data ----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or datamodule.tokenizer is None:
            return
        n_tokens = datamodule.tokenizer_vocab_size
        if self.config.vocab_size is None:
            self.config = dataclasses.replace(self.config, vocab_size=n_tokens)
            self.hparams.vocab_size = n_tokens
        elif self.config.vocab_size < n_tokens:
            source = datamodule.hparams.tokenizer_path or "the trained tokenizer"
            raise ConfigError(
                f"model.vocab_size={self.config.vocab_size} is smaller than the vocabulary of {source} "
                f"({n_tokens} tokens); unset model.vocab_size or set it to at least {n_tokens}"
            )
        check_same_tokenizer(self.tokenizer_json, datamodule.tokenizer.to_str())
        self.tokenizer_json = datamodule.tokenizer.to_str()
        self.chat_template = getattr(datamodule, "chat_template", None) or self.chat_template
        self.token_bytes = datamodule.token_byte_lengths().to(self.device)

    def configure_model(self) -> None:
        if self.model is None:
            if self.config.vocab_size is None:
                raise ConfigError("model.vocab_size is unknown: set it, or train with a datamodule that has a tokenizer")
            self._build()
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for any fp32 work left under autocast
        if self.hparams.compile and not getattr(self, "_compiled", False):
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
            # Compile the inner model in place: torch.compile(lightning_module) fails inside self.log.
            self.model.compile()
            self._compiled = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TOKENIZER_KEY] = self.tokenizer_json  # a plain str: loads with weights_only=True
        checkpoint[SKIPPED_BATCHES_KEY] = self.skipped_batches
        if self.chat_template is not None:  # the template it was trained to answer in: chat and export read it
            checkpoint[CHAT_TEMPLATE_KEY] = self.chat_template
        if self.lora_base:  # the adapters only; the frozen base is found again from its source
            checkpoint[LORA_KEY] = self.lora_base
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.") or is_adapter_key(k)
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuses a checkpoint of another shape or tokenizer with one line, before its weights are loaded."""
        check_shape(checkpoint.get("hyper_parameters", {}), self.hparams)
        check_same_tokenizer(checkpoint.get(TOKENIZER_KEY), self.tokenizer_json)
        self.tokenizer_json = checkpoint.get(TOKENIZER_KEY)
        self.skipped_batches = checkpoint.get(SKIPPED_BATCHES_KEY, 0)
        self.chat_template = checkpoint.get(CHAT_TEMPLATE_KEY, self.chat_template)
        if LORA_KEY in checkpoint:
            if checkpoint[LORA_KEY] != self.lora_base:
                check_base(checkpoint[LORA_KEY], "being resumed")
                raise CheckpointError(
                    f"the LoRA checkpoint was trained on {checkpoint[LORA_KEY]['path']}, not on model.init_from="
                    f"{self.hparams.init_from}; resume with the run's own config"
                )
            checkpoint["state_dict"] = self.state_dict() | checkpoint["state_dict"]  # the base, from init_from
        if LEGACY_LOSS_WINDOW_KEY in checkpoint:  # written before the window was a metric: a sum and a count
            total, count = checkpoint[LEGACY_LOSS_WINDOW_KEY]
            state = checkpoint["state_dict"]
            state.setdefault("train_loss.mean_value", torch.tensor(float(total), dtype=torch.get_default_dtype()))
            state.setdefault("train_loss.weight", torch.tensor(float(count), dtype=torch.get_default_dtype()))

    # --- steps -------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _token_losses(
        self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The loss to train on, the per-target losses, the targets and, for a batch of conversations
        ``(ids, trained)``, which targets count (the loss is then the mean over those)."""
        ids, trained = batch if isinstance(batch, (tuple, list)) else (batch, None)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        weights = None
        if trained is not None:
            trained = trained[:, 1:].reshape(-1)
            # A batch whose conversations have no target left (all cut off) gives 0, not 0/0.
            weights = trained / trained.sum().clamp(min=1)
        loss, losses = self.model(inputs, targets=targets, target_weights=weights)
        return loss, losses, targets.reshape(-1), trained

    def training_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self._token_losses(batch)[0]
        # A device sync each step: the price of stopping or skipping a bad batch before it reaches the weights.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return self._nonfinite_loss(loss)
        # Log the window's mean loss only on the steps Lightning writes logs (its test:
        # (batches_that_stepped + 1) % log_every_n_steps == 0): each self.log call costs ~1 ms of
        # Python, several % of a small model's step.
        self.train_loss.update(loss.detach())
        if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", self.train_loss.compute(), prog_bar=True)
            # One name for one schedule (LearningRateMonitor would log "lr-AdamW/pg1" and "/pg2").
            self.log("lr", self.optimizers().param_groups[0]["lr"])
            self.train_loss.reset()
        return loss

    def _nonfinite_loss(self, loss: torch.Tensor) -> None:
        """Stop, or skip the batch: returning ``None`` from ``training_step`` makes Lightning skip backward and step."""
        if self.hparams.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {self.global_step}; stopped before updating the weights, "
                "the checkpoints already written are kept: resume with --ckpt_path last --model.nonfinite_loss skip "
                "to skip such batches, or start again with a lower model.learning_rate"
            )
        self.skipped_batches += 1
        step, n = self.global_step, self.skipped_batches
        rank_zero_warn(f"the training loss is {loss.item()} at step {step}: batch skipped ({n} so far)")
        for logger in self.loggers:  # now: self.log would reach the logger only at a log_every_n_steps step
            logger.log_metrics({"train/skipped_batches": float(self.skipped_batches)}, step=self.global_step)
        return None

    def validation_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        _, losses, targets, trained = self._token_losses(batch)
        if trained is not None:  # conversations: the assistant's tokens only
            losses, targets = losses[trained], targets[trained]
        self.val_nats.update(losses.sum())
        self.val_tokens.update(losses.numel())
        self.val_bytes.update(self.token_bytes[targets].sum())

    def on_validation_epoch_end(self, split: str = "val") -> None:
        # torchmetrics sums across processes, so every rank holds the values of the whole split;
        # sync_dist then only averages equal numbers (and silences Lightning's warning).
        nats, n_tokens, n_bytes = self.val_nats.compute(), self.val_tokens.compute(), self.val_bytes.compute()
        loss = nats / n_tokens
        self.log_dict(
            {f"{split}/loss": loss, f"{split}/ppl": torch.exp(loss), f"{split}/bpb": nats / math.log(2) / n_bytes.clamp(min=1)},
            prog_bar=True,
            sync_dist=True,
        )
        for metric in (self.val_nats, self.val_tokens, self.val_bytes):
            metric.reset()

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end("test")

    # --- optimizer ---------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        # A fused AdamW unscales fp16 gradients itself, after clipping would have seen them scaled.
        fused = self.device.type in ("cuda", "cpu") and self.trainer.precision not in ("16-mixed", "16-true")
        try:
            optimizer = build_optimizer(
                self.model, hp.optimizer, hp.learning_rate, hp.muon_lr, hp.weight_decay, tuple(hp.betas), fused,
                hp.get("muon_weight_decay"),
            )
        except ValueError as e:
            raise ConfigError(f"model.optimizer: {e}") from None
        total = hp.lr_decay_steps or int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, even under bf16
        # where no gradient scaler is involved (lightning/pytorch/plugins/precision/amp.py,
        # clip_gradients); gradients here are already unscaled, so clip them directly.
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
