"""Shared fixtures: small real corpora, a temporary MLflow store and cache, and a CLI runner."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Short public-domain Chinese poems (Tang dynasty), written out here so the tests need no data files.
CHINESE = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n"
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。\n"
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。\n"
)

TINY_CONFIG = """
seed_everything: 7
model:
  block_size: 32
  n_layer: 2
  n_head: 2
  n_embd: 32
  learning_rate: 3.0e-3
  warmup_steps: 5
data:
  vocab_size: 320
  batch_size: 8
trainer:
  max_steps: 30
  val_check_interval: 10
  log_every_n_steps: 5
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  precision: 32-true
"""


def english_text(n_bytes: int = 60_000) -> str:
    """Real English prose: the start of Python's reference documentation that ships with CPython."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text[:n_bytes]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder, with its own MLflow store and token cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(english_text(), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG, encoding="utf-8")
    return path


def run_cli(*args: str, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``lm-lightning`` console script in a subprocess (``input`` on its stdin)."""
    exe = Path(sys.executable).with_name("lm-lightning")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env, input=input)


@contextlib.contextmanager
def single_thread():
    """torch on one thread: on 2 cores shared with other work, two OpenMP threads wait on each other
    and small ops run 30-100x slower; one thread is fast whatever the load."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real 150-step fit of a tiny model on English and Chinese text, in process, recorded in MLflow
    with the always-on callbacks: its best checkpoint, run id and tracking URI, and the RNG states
    seen around the sampling callback. Shared by the generation, export and serving tests."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lm_lightning.callbacks import MLflowRunInfo, TextSamples
    from lm_lightning.data import TextDataModule
    from lm_lightning.logger import MLflowLogger
    from lm_lightning.module import LanguageModel

    class RngProbe(L.Callback):
        def __init__(self):
            self.states = []

        def on_validation_end(self, trainer, pl_module):
            self.states.append(torch.get_rng_state())

    root = tmp_path_factory.mktemp("tiny_run")
    (root / "corpus.txt").write_text(english_text(40_000) + "\n" + CHINESE * 40, encoding="utf-8")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    logger = MLflowLogger(experiment_name="tiny", tracking_uri=tracking_uri)
    before, after = RngProbe(), RngProbe()
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", monitor="val/loss", filename="best")
    L.seed_everything(7)
    trainer = L.Trainer(
        max_steps=150, val_check_interval=50, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        logger=logger, callbacks=[checkpoint, MLflowRunInfo(), before, TextSamples(["The ", "床前"], max_new_tokens=16), after],
        enable_progress_bar=False, enable_model_summary=False, enable_autolog_hparams=False,
        precision="32-true", accelerator="cpu", devices=1,
    )
    model = LanguageModel(block_size=32, n_layer=2, n_head=2, n_embd=32, learning_rate=1e-2, warmup_steps=10)
    data = TextDataModule(path=str(root / "corpus.txt"), vocab_size=400, block_size=32, batch_size=8, cache_dir=str(root / "cache"))
    with single_thread():
        trainer.fit(model, data)
    return {
        "checkpoint": Path(checkpoint.best_model_path),
        "run_id": logger.run_id,
        "tracking_uri": tracking_uri,
        "rng_around_samples": list(zip(before.states, after.states)),
    }
