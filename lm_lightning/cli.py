"""The ``lm-lightning`` command: LightningCLI for fit / validate / test, in omegaconf mode."""

from __future__ import annotations

import os
import sys
import warnings

import torch

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from jsonargparse import lazy_instance

from lm_lightning import commands
from lm_lightning.callbacks import MLflowConfig, MLflowRunInfo, TextSamples, TokensPerSecond
from lm_lightning.checkpoint import CheckpointError
from lm_lightning.data import DataError, TextDataModule
from lm_lightning.logger import MLflowLogger
from lm_lightning.module import LanguageModel
from lm_lightning.tokenizer import TokenizerError


class LMCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision in (None, "auto"):
            config.trainer.precision = auto_precision(config.trainer.accelerator)
        # Lightning picks RichProgressBar whenever `rich` happens to be installed, which shows
        # "Epoch 0/-2" for step-based runs; choose the bar here so it does not depend on the environment.
        if config.trainer.enable_progress_bar is not False and not any(
            "ProgressBar" in str(getattr(c, "class_path", c)) for c in config.trainer.callbacks or []
        ):
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], TQDMProgressBar()]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.block_size", "data.block_size")
        # Checkpointing, early stopping and text samples are always on, and configurable under their own keys.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(TextSamples, "samples")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
                "early_stopping.monitor": "val/loss",
                "early_stopping.patience": 5,
                "early_stopping.check_finite": True,
                "trainer.logger": lazy_instance(MLflowLogger),
                "trainer.plugins": [{"class_path": "lm_lightning.checkpoint.AtomicCheckpointIO"}],
                "trainer.default_root_dir": "runs",
                "trainer.max_steps": 2000,
                "trainer.max_epochs": -1,
                "trainer.val_check_interval": 200,
                "trainer.check_val_every_n_epoch": None,  # validate every val_check_interval steps across epochs
                "trainer.log_every_n_steps": 10,
                "trainer.gradient_clip_val": 1.0,
                "trainer.use_distributed_sampler": False,  # the data module shards by rank itself
                "trainer.enable_autolog_hparams": False,  # MLflowConfig logs the whole resolved config instead
            }
        )


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_precision(accelerator: str | None) -> str:
    """bf16 autocast where the hardware runs bf16 matmuls natively (recent GPUs, CPUs with AMX or
    AVX512-BF16), full fp32 elsewhere: emulated bf16 is slower than fp32."""
    if accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if _cpu_has_bf16() else "32-true"


USER_ERRORS = (DataError, TokenizerError, CheckpointError, ValueError, FileNotFoundError)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lm-lightning``."""
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, on every step it logs.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in commands.COMMANDS:  # generate, export: outside LightningCLI
            commands.run(argv[0], argv[1:])
            return
        LMCLI(
            LanguageModel,
            TextDataModule,
            seed_everything_default=1337,
            # Always present, in addition to any trainer.callbacks in the config.
            trainer_defaults={"callbacks": [TokensPerSecond(), MLflowRunInfo()]},
            auto_configure_optimizers=False,  # LanguageModel.configure_optimizers owns AdamW and its schedule
            save_config_callback=MLflowConfig,
            save_config_kwargs={"save_to_log_dir": False},
            # allow_abbrev=False: argparse would otherwise take --trainer.max_step for --trainer.max_steps.
            parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False},
            args=args,
        )
    except USER_ERRORS as e:
        if os.environ.get("LM_LIGHTNING_DEBUG"):
            raise
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
