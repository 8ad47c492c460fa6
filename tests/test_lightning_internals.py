"""Lightning's private members that lm_lightning relies on, each for a reason named where it is used. An
upgrade of Lightning that renames or reshapes one fails here, not silently in a run."""

import inspect

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer import call


def test_cli_resolves_ckpt_path_in_a_private_hook_we_override():
    # trainer_cli.LMCLI._parse_ckpt_path keeps the user's model config on resume.
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI)
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]


def test_model_checkpoint_private_save_steps():
    # callbacks.LastCheckpoint saves last.ckpt at the end of training and on SIGTERM through these.
    assert list(inspect.signature(ModelCheckpoint._should_skip_saving_checkpoint).parameters) == ["self", "trainer"]
    assert list(inspect.signature(ModelCheckpoint._monitor_candidates).parameters) == ["self", "trainer"]
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters) == ["self", "trainer", "monitor_candidates"]


def test_mlflow_logger_private_state(tmp_path):
    # tracking.logger.MLflowLogger: lazy start (_initialized), resumed run id (_run_id), the log_model switch
    # (_log_model).
    logger = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", log_model=True, run_id="abc")
    assert logger._initialized is False
    assert logger._run_id == "abc"
    assert logger._log_model is True
    assert logger._tracking_uri.startswith("sqlite:")  # tracking.records.ui_address


def test_fit_loop_batch_progress_counter():
    # data.datamodule: the resumable loader's position is the fit loop's count of processed batches.
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.fit_loop.epoch_loop.batch_progress.current.processed == 0
    # callbacks.BestScores logs best/* at the step val/* is logged at: the epoch loop's logging counter.
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 0
    assert trainer.fit_loop.epoch_loop.batch_progress.total.processed == 0


def test_exceptions_reach_loggers_as_finalize_failed():
    # tracking.logger.MLflowLogger.finalize tells SIGTERM and Ctrl-C from errors by the exception being handled.
    assert 'logger.finalize("failed")' in inspect.getsource(call._interrupt)


def test_cli_private_subcommand_run_and_parsers():
    # trainer_cli.LMCLI._run_subcommand deletes the run a user error stopped before any step; _parse_ckpt_path
    # reads the subcommand's parser defaults from _subcommand_parsers to tell the flags a user set.
    assert list(inspect.signature(LightningCLI._run_subcommand).parameters) == ["self", "subcommand"]
    assert "self._subcommand_parsers" in inspect.getsource(LightningCLI)
