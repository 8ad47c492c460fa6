"""Faults: a kill during a save, a full disk, a non-finite loss, Ctrl-C, two runs at once, a malicious checkpoint."""

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import metric_history, only_run, run_main
from lm_lightning import checkpoint as checkpoint_module
from lm_lightning.callbacks import AtomicCheckpointIO
from lm_lightning.checkpoint import CheckpointError, load_checkpoint
from lm_lightning.data import TextDataModule
from lm_lightning.files import WriteError
from lm_lightning.module import LanguageModel
from lm_lightning.tokenizer import save_tokenizer, train_tokenizer

SHORT = ["--trainer.max_steps", "12", "--trainer.log_every_n_steps", "1", "--last_checkpoint.every_n_train_steps", "4"]


def fit(corpus, tiny_config, *args: str) -> int:
    return run_main("fit", "--config", str(tiny_config), "--data.path", str(corpus), *SHORT, *args)


def last_ckpt(root: Path) -> Path:
    (path,) = root.glob("runs/*/*/checkpoints/last.ckpt")
    return path


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*.tmp")]


def test_kill_9_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "w": torch.ones(3)}, path)
    # A real process killed while torch.save has written half of the new checkpoint.
    script = f"""
import os, signal, torch
from lm_lightning.callbacks import AtomicCheckpointIO
def half_then_die(obj, f):
    with open(f, "wb") as out:
        out.write(b"PK\\x03\\x04" + b"\\0" * 1000)
        out.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
AtomicCheckpointIO().save_checkpoint({{"global_step": 8}}, {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr[-2000:]
    (left,) = tmp_path.glob(".last.ckpt.*.tmp")  # the killed writer's temporary, never read
    assert load_checkpoint(path)["global_step"] == 4
    AtomicCheckpointIO().save_checkpoint({"global_step": 12}, path)
    assert load_checkpoint(path)["global_step"] == 12 and not left.exists()  # cleaned up by the next save


def test_disk_full_while_saving_a_checkpoint(corpus, tiny_config, mlflow_store, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_then_fill_the_disk(obj, f):
        calls.append(f)
        if len(calls) == 2:  # step 8: the disk is full halfway through the write
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_fill_the_disk)
    assert fit(corpus, tiny_config, "--trainer.logger.init_args.experiment_name", "full") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    last = last_ckpt(Path.cwd())
    assert error == f"error: cannot write checkpoint {last.relative_to(Path.cwd())}: No space left on device; the previous last.ckpt is intact"
    assert load_checkpoint(last)["global_step"] == 4
    assert no_temporaries(Path.cwd())
    run = only_run(MlflowClient(mlflow_store), "full")
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]


def test_disk_full_while_writing_the_token_cache(corpus, tmp_path, monkeypatch):
    save_tokenizer(train_tokenizer([corpus.read_text()], 300), tmp_path / "tokenizer.json")
    dm = TextDataModule(str(corpus), tokenizer_path=str(tmp_path / "tokenizer.json"), block_size=16, batch_size=4)
    dm.prepare_data()
    before = {p.name: p.read_bytes() for p in dm.folder.iterdir()}
    corpus.write_text(corpus.read_text() + "\nMore text, so the cache must be rebuilt.\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the token files are written; flushing them to disk fails
    with pytest.raises(WriteError, match=r"cannot build the token cache in .*: No space left on device; the previous cache is intact"):
        dm.prepare_data()
    assert {p.name: p.read_bytes() for p in dm.folder.iterdir()} == before
    monkeypatch.undo()
    dm.prepare_data()  # space again: rebuilt
    dm.setup("fit")
    assert dm.meta["corpus_sha256"] != ""


def _nan_at(monkeypatch, steps: set[int]) -> None:
    real = LanguageModel._token_losses

    def losses(self, batch):
        loss, losses, targets, trained = real(self, batch)
        return (loss * float("nan") if self.training and self.global_step in steps else loss), losses, targets, trained

    monkeypatch.setattr(LanguageModel, "_token_losses", losses)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tiny_config, mlflow_store, monkeypatch, capsys):
    _nan_at(monkeypatch, {6})
    assert fit(corpus, tiny_config, "--trainer.logger.init_args.experiment_name", "nan") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the training loss is nan at step 6; stopped before updating the weights")
    ckpt = load_checkpoint(last_ckpt(Path.cwd()))
    assert ckpt["global_step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    run = only_run(MlflowClient(mlflow_store), "nan")
    assert run.info.status == "FAILED" and "step 6" in run.data.tags["error"]


def test_nonfinite_loss_can_skip_the_batch(corpus, tiny_config, mlflow_store, monkeypatch):
    _nan_at(monkeypatch, {3, 5})
    assert fit(corpus, tiny_config, "--model.nonfinite_loss", "skip", "--trainer.logger.init_args.experiment_name", "skip") == 0
    client = MlflowClient(mlflow_store)
    run = only_run(client, "skip")
    assert run.info.status == "FINISHED"
    assert metric_history(client, run.info.run_id, "train/skipped_batches") == [(3, 1.0), (5, 2.0)]
    ckpt = load_checkpoint(last_ckpt(Path.cwd()))
    assert ckpt["skipped_batches"] == 2 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_ctrl_c_stops_after_the_step_saves_a_checkpoint_and_marks_the_run_killed(corpus, tiny_config, mlflow_store, monkeypatch, capsys):
    real, handler = LanguageModel.training_step, signal.getsignal(signal.SIGINT)

    def pressed_during_step_6(self, batch, batch_idx):
        if self.global_step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModel, "training_step", pressed_during_step_6)
    assert fit(corpus, tiny_config, "--trainer.logger.init_args.experiment_name", "ctrl-c") == 128 + signal.SIGTERM
    assert "stopped by SIGTERM or Ctrl-C" in capsys.readouterr().err
    assert load_checkpoint(last_ckpt(Path.cwd()))["global_step"] == 7  # the step under way was finished
    assert only_run(MlflowClient(mlflow_store), "ctrl-c").info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is Python's own again


def test_two_runs_started_at_once_share_a_fresh_cache_and_store(corpus, tiny_config, tmp_path):
    # A fresh folder: the token cache and the MLflow database are both created by the two runs at once.
    exe = Path(sys.executable).with_name("lm-lightning")
    args = [str(exe), "fit", "--config", str(tiny_config), "--data.path", str(corpus), "--trainer.max_steps", "6"]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in runs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    finished = client.search_runs([client.get_experiment_by_name("lm_lightning").experiment_id])
    assert [r.info.status for r in finished] == ["FINISHED", "FINISHED"]
    assert len({r.data.tags["corpus_sha256"] for r in finished}) == 1 and no_temporaries(tmp_path)
    dm = TextDataModule(str(corpus), vocab_size=320, block_size=32, batch_size=8)
    dm.setup("fit")  # the cache the two runs left loads as whole, and holds the corpus
    assert dm.tokenizer.decode(np.concatenate([dm.tokens["train"], dm.tokens["val"]]).tolist()) == corpus.read_text()


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path, corpus, tiny_config, mlflow_store, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "payload": Payload()}, tmp_path / "evil.ckpt")
    assert fit(corpus, tiny_config, "--ckpt_path", str(tmp_path / "evil.ckpt")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: cannot load checkpoint {tmp_path / 'evil.ckpt'}: it holds objects that are not plain tensors and containers, refused for safety"
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    package = Path(__file__).resolve().parents[1] / "lm_lightning"
    calls = [(p.name, m.group(0)) for p in package.glob("*.py") for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls and all("weights_only=True" in call for _, call in calls), calls
