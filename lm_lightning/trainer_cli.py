"""LightningCLI for ``lm-lightning fit | validate | test``, in omegaconf mode, with our defaults."""

from __future__ import annotations

import sys

from jsonargparse import ArgumentError, Namespace, lazy_instance
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lm_lightning.callbacks import (
    BestScores,
    GracefulCtrlC,
    LastCheckpoint,
    ResumeState,
    StepProgressBar,
    TextSamples,
    TokensPerSecond,
    ValidateLastStep,
)
from lm_lightning.cli_hints import did_you_mean, option_strings
from lm_lightning.data import TextDataModule
from lm_lightning.data.corpus import DataError
from lm_lightning.data.datamodule import NO_TEST_SPLIT
from lm_lightning.errors import ConfigError, UserError
from lm_lightning.hardware import auto_precision
from lm_lightning.module import LanguageModel
from lm_lightning.pretrained import apply_init_from
from lm_lightning.scoring import adopt_checkpoint
from lm_lightning.tracking.logger import MLflowLogger, mlflow_logger
from lm_lightning.tracking.names import name_run
from lm_lightning.tracking.records import MLflowConfig, MLflowRunInfo
from lm_lightning.tracking.runs import check_tracking_store, resolve_ckpt_path

UNSET_BLOCK_SIZE = -(2**62)  # no one types it: marks model.block_size as not given


class LMCLI(LightningCLI):
    def __init__(self, *args, subcommand: str | None = None, **kwargs) -> None:
        """``subcommand``: build only that subcommand's parser (``None``: all of them)."""
        self.only_subcommand = subcommand
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        # predict is not offered: a language model's predictions are `lm-lightning generate` and `evaluate`.
        offered = {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}
        # Each subcommand's parser introspects every class in it (~0.4 s, a third of `fit --help`): when the command
        # line names one, only that one is built.
        return {self.only_subcommand: offered[self.only_subcommand]} if self.only_subcommand else offered

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise ArgumentError(None, did_you_mean(str(e), sorted(set(option_strings(parser))))) from None
        self.given_model = self._given_model_fields(args)

    def _given_model_fields(self, args: list[str] | None) -> dict:
        """The model fields the command line and config files set (~15 ms to parse again without defaults): one set
        to its default value (``--model.block_size 256``) is still the user's, which a source's must not replace."""
        subcommand, args = self.config.get("subcommand"), list(sys.argv[1:] if args is None else args)
        if subcommand not in args:
            return {}
        # jsonargparse's link model.block_size -> data.block_size needs an int there: a marker, dropped below.
        unset = Namespace(model=Namespace(block_size=UNSET_BLOCK_SIZE))
        given = self._subcommand_parsers[subcommand].parse_args(
            args[args.index(subcommand) + 1 :], namespace=unset, defaults=False, _skip_validation=True
        )
        return {k: v for k, v in (given.get("model") or Namespace()).as_dict().items() if not (k == "block_size" and v == UNSET_BLOCK_SIZE)}

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.model.optimizer == "muon" and "fsdp" in str(config.trainer.strategy).lower():
            # FSDP flattens parameters: Muon needs whole matrices. Said now, before any tokenizing.
            raise ConfigError("model.optimizer=muon needs whole weight matrices, which FSDP shards; use DDP or model.optimizer=adamw")
        if config.trainer.precision in (None, "auto"):
            config.trainer.precision = auto_precision(config.trainer.accelerator, config.model.n_embd)
        # Lightning picks RichProgressBar whenever `rich` happens to be installed, which shows
        # "Epoch 0/-2" for step-based runs; choose the bar here so it does not depend on the environment.
        if config.trainer.enable_progress_bar is not False and not any(
            "ProgressBar" in str(getattr(c, "class_path", c)) for c in config.trainer.callbacks or []
        ):
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], StepProgressBar()]

    def _parse_ckpt_path(self) -> None:
        # A private hook of LightningCLI (pinned by tests/test_lightning_internals.py). Its own version replaces
        # the model config with the checkpoint's hyperparameters when ckpt_path is a file (lightning/pytorch/cli.py):
        # a resume with a changed option such as model.nonfinite_loss would silently lose it, and "last" would
        # behave unlike a path. Here the config stays what the user wrote; a checkpoint of another shape is refused.
        # Also where the run is named: before seed_everything seeds the random generators.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config, tags = self.config[subcommand], {}
        given = self.given_model
        check_tracking_store(config)
        if subcommand in ("validate", "test"):
            if config.ckpt_path in (None, "last"):
                raise UserError(f"{subcommand} scores a checkpoint: pass --ckpt_path path/to/best.ckpt")
            if subcommand == "test" and not config.data.test_fraction:
                raise DataError(NO_TEST_SPLIT)
            tags = adopt_checkpoint(config, given)
            given = config.model.as_dict()  # the checkpoint's shape (a LoRA one's base is init_from, below)
        if config.model.get("init_from"):  # before a resumed checkpoint's shape is checked against the config
            apply_init_from(config, given)  # the model's shape and tokenizer come from the source
        self._resume_lock = resolve_ckpt_path(config, subcommand)
        name_run(config, subcommand, tags)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except UserError:
            # A user's mistake found once the run had started (a corpus too short, say) leaves no FAILED run
            # behind, unless it continued a run or trained a step.
            logger = mlflow_logger(self.trainer)
            if logger is not None and logger._initialized and not logger.resumed and self.trainer.global_step == 0:
                logger.experiment.delete_run(logger.run_id)
            raise
        finally:
            if getattr(self, "_resume_lock", None) is not None:
                self._resume_lock.release()

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
                "trainer.plugins": [{"class_path": "lm_lightning.callbacks.AtomicCheckpointIO"}],
                "trainer.default_root_dir": "runs",
                "trainer.max_steps": 2000,
                "trainer.max_epochs": -1,
                "trainer.val_check_interval": 200,
                "trainer.check_val_every_n_epoch": None,  # validate every val_check_interval steps across epochs
                "trainer.log_every_n_steps": 10,
                "trainer.gradient_clip_val": 1.0,
                "trainer.use_distributed_sampler": False,  # the data module shards by rank itself
                "trainer.enable_autolog_hparams": False,  # MLflowConfig logs the whole resolved config instead
                # Its table's FLOPs column is all zeros (no example input); MLflowRunInfo prints the parameter count.
                "trainer.enable_model_summary": False,
            }
        )


def run_trainer_cli(args: list[str] | None, subcommand: str | None = None) -> None:
    """``lm-lightning fit | validate | test`` with ``args`` (``None``: ``sys.argv``); ``subcommand``: the one
    ``args`` starts with, when known (only its parser is built)."""
    LMCLI(
        LanguageModel,
        TextDataModule,
        seed_everything_default=1337,
        # Always present, in addition to any trainer.callbacks in the config.
        trainer_defaults={
            "callbacks": [TokensPerSecond(), BestScores(), MLflowRunInfo(), ResumeState(), GracefulCtrlC(), ValidateLastStep()]
        },
        auto_configure_optimizers=False,  # LanguageModel.configure_optimizers owns AdamW and its schedule
        save_config_callback=MLflowConfig,
        save_config_kwargs={"save_to_log_dir": False},
        # allow_abbrev=False: argparse would otherwise take --trainer.max_step for --trainer.max_steps.
        parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False, "exit_on_error": False},
        args=args,
        subcommand=subcommand,
    )
