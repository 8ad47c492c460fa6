"""The ``lm-lightning`` command: LightningCLI for fit / validate / test, in omegaconf mode."""

from __future__ import annotations

import os
import sys
import warnings

import torch

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from jsonargparse import ArgumentError, lazy_instance

from lm_lightning import commands
from lm_lightning.callbacks import GracefulCtrlC, MLflowConfig, MLflowRunInfo, TextSamples, TokensPerSecond
from lm_lightning.checkpoint import CheckpointError, LastCheckpoint
from lm_lightning.data import DataError, TextDataModule
from lm_lightning.files import WriteError
from lm_lightning.logger import MLflowLogger
from lm_lightning.module import LanguageModel, NonFiniteLossError
from lm_lightning.resume import ResumeState, resolve_ckpt_path
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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's own version replaces the model config with the checkpoint's hyperparameters when
        # ckpt_path is a file (lightning/pytorch/cli.py): a resume with a changed option such as
        # model.nonfinite_loss would silently lose it, and "last" would behave unlike a path. Here the config
        # stays what the user wrote, and a checkpoint of another shape is refused with one line.
        if subcommand := self.config.get("subcommand"):
            resolve_ckpt_path(self.config[subcommand], subcommand)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.block_size", "data.block_size")
        # Checkpointing, early stopping and text samples are always on, and configurable under their own keys:
        # best.ckpt on validation loss (checkpoint.*), last.ckpt every few steps to resume from (last_checkpoint.*).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(TextSamples, "samples")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.filename": "best",
                "checkpoint.save_last": False,  # last_checkpoint owns last.ckpt
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
"""Bad input: a one-line ``error: ...`` and exit code 2."""
RUN_ERRORS = (NonFiniteLossError, WriteError)
"""A run that could not go on (the checkpoints it wrote are intact): a one-line ``error: ...`` and exit code 1."""
SIGTERM_EXIT_CODE = 128 + 15  # the shell's code for a process ended by SIGTERM: job schedulers see it did not finish


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lm-lightning``."""
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, on every step it logs.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in commands.COMMANDS:  # generate, export: outside LightningCLI
            commands.run(argv[0], argv[1:])
            return
        if argv and argv[0] == "sweep":  # an Optuna study whose trials are fit processes
            from lm_lightning.sweep.run import main as sweep

            sweep(argv[1:])
            return
        LMCLI(
            LanguageModel,
            TextDataModule,
            seed_everything_default=1337,
            # Always present, in addition to any trainer.callbacks in the config.
            trainer_defaults={"callbacks": [TokensPerSecond(), MLflowRunInfo(), ResumeState(), GracefulCtrlC()]},
            auto_configure_optimizers=False,  # LanguageModel.configure_optimizers owns AdamW and its schedule
            save_config_callback=MLflowConfig,
            save_config_kwargs={"save_to_log_dir": False},
            # allow_abbrev=False: argparse would otherwise take --trainer.max_step for --trainer.max_steps.
            parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False, "exit_on_error": False},
            args=args,
        )
    except SIGTERMException:
        print("stopped by SIGTERM or Ctrl-C: continue with the same command and --ckpt_path last", file=sys.stderr)
        sys.exit(SIGTERM_EXIT_CODE)
    except (ArgumentError, *USER_ERRORS, *RUN_ERRORS) as e:
        if os.environ.get("LM_LIGHTNING_DEBUG"):
            raise
        hint = " (--help lists every key)" if isinstance(e, ArgumentError) else ""
        print(f"error: {_one_line(e)}{hint}", file=sys.stderr)
        sys.exit(1 if isinstance(e, RUN_ERRORS) else 2)


if __name__ == "__main__":
    main()
