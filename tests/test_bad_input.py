"""Bad input, tried systematically through ``lm-lightning fit`` (in this process: a subprocess would add only
import time; test_cli.py runs the real console script). Each must end with a one-line ``error: ...`` naming the
problem, a non-zero exit code, and nothing half-made: no temporary file, no checkpoint, no MLflow run left
RUNNING."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BAD_CORPORA, run_folder, run_main, workdir
from lm_lightning.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("mlflow_store", "tiny_config")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mlflow_template) -> Path:
    """A real checkpoint of the tiny model (block_size 32, n_embd 32), after 2 steps."""
    root = run_folder(tmp_path_factory, mlflow_template, "checkpoint")
    with workdir(root):
        assert run_main("fit", "--config", "tiny.yaml", "--data.path", "corpus.txt", "--trainer.max_steps", "2") == 0
    (path,) = root.glob("runs/*/*/checkpoints/last.ckpt")
    return path


def fails(tmp_path: Path, capsys, *args: str) -> str:
    """Run ``fit`` with the tiny config and ``args``; check it failed cleanly; return its one-line error."""
    code = run_main("fit", "--config", str(tmp_path / "tiny.yaml"), *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err and err[-1].startswith("error: "), err[-20:]
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob("runs/**/*.ckpt"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(run.info.status == "FAILED" for run in runs), [run.info.status for run in runs]
    print(f"{' '.join(args)[:70]!r:74} -> {err[-1]}")
    return err[-1]


@pytest.mark.parametrize("make, message", BAD_CORPORA.values(), ids=BAD_CORPORA.keys())
def test_bad_corpus(tmp_path, capsys, make, message):
    assert message in fails(tmp_path, capsys, "--data.path", str(make(tmp_path)))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.n_embd", "30", "--model.n_head", "4"], "n_embd=30 is not divisible by n_head=4"),
        (["--model.n_layr", "3"], "unrecognized arguments: --model.n_layr 3"),
        (["--trainer.max_steps", "abc"], 'Parser key "trainer.max_steps": Expected a <class \'int\'>. Got value: abc'),
        (["--model.learning_rate", "-1"], "model.learning_rate=-1.0 must be positive"),
        (["--data.val_fraction", "0"], "data.val_fraction=0.0 must be between 0 and 1"),
        (["--data.val_fraction", "1"], "data.val_fraction=1.0 must be between 0 and 1"),
    ],
    ids=["n_embd-not-divisible-by-n_head", "unknown-key", "wrong-type", "negative-learning-rate", "val_fraction-0", "val_fraction-1"],
)
def test_bad_config(tmp_path, capsys, args, message):
    assert message in fails(tmp_path, capsys, *args)


def test_unknown_key_in_a_config_file(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("model:\n  n_layr: 3\n")
    assert "model.n_layr" in fails(tmp_path, capsys, "--config", str(tmp_path / "typo.yaml"))


def test_tokenizer_with_more_tokens_than_the_set_vocab_size(tmp_path, capsys, corpus):
    save_tokenizer(train_tokenizer([corpus.read_text()], 400), tmp_path / "tok.json")
    error = fails(tmp_path, capsys, "--data.path", str(corpus), "--data.tokenizer_path", str(tmp_path / "tok.json"), "--model.vocab_size", "300")
    assert "model.vocab_size=300 is smaller than the vocabulary of" in error and "(400 tokens)" in error


def test_tokenizer_file_that_is_not_json(tmp_path, capsys, corpus):
    (tmp_path / "tok.json").write_text("vocab: not json")
    assert "is not a valid tokenizer.json" in fails(tmp_path, capsys, "--data.path", str(corpus), "--data.tokenizer_path", str(tmp_path / "tok.json"))


def test_truncated_checkpoint(tmp_path, capsys, corpus, checkpoint):
    (tmp_path / "cut.ckpt").write_bytes(checkpoint.read_bytes()[:5000])
    error = fails(tmp_path, capsys, "--data.path", str(corpus), "--ckpt_path", str(tmp_path / "cut.ckpt"))
    assert "cut.ckpt: it is truncated or not a checkpoint" in error


def test_missing_checkpoint(tmp_path, capsys, corpus):
    assert "checkpoint nope.ckpt does not exist" in fails(tmp_path, capsys, "--data.path", str(corpus), "--ckpt_path", "nope.ckpt")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.n_embd", "48"], "the checkpoint has a different model shape: n_embd=32 (config: 48)"),
        (["--model.block_size", "64"], "the checkpoint has a different model shape: block_size=32 (config: 64)"),
    ],
    ids=["other-width", "block_size-beyond-position-table"],
)
def test_checkpoint_of_another_shape(tmp_path, capsys, corpus, checkpoint, args, message):
    assert message in fails(tmp_path, capsys, "--data.path", str(corpus), "--ckpt_path", str(checkpoint), *args)
