"""A day with the tool: runs told apart by name, best scores as metrics, scoring a checkpoint on new text
(validate / test without shape flags, evaluate every token once), a test split, "did you mean"."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import english_text, metric_history, run_cli, run_main, workdir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two fits of one config (12 steps, validating every 6), in process, with a test split."""
    from conftest import TINY_CONFIG

    root = tmp_path_factory.mktemp("two_runs")
    (root / "tiny.yaml").write_text(TINY_CONFIG, encoding="utf-8")
    (root / "corpus.txt").write_text(english_text(), encoding="utf-8")
    with workdir(root) as uri:
        args = ["fit", "--config", "tiny.yaml", "--data.path", "corpus.txt", "--data.test_fraction", "0.1",
                "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--samples.max_new_tokens", "4"]
        assert run_main(*args) == 0
        assert run_main(*args) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lm_lightning").experiment_id], order_by=["start_time"])
    return root, uri, client, runs


def test_runs_of_one_config_have_distinct_readable_names(two_runs):
    _, _, _, runs = two_runs
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == 2
    assert all(name.startswith("tiny-2x32-lr3e-3-") for name in names), names
    assert all(r.data.tags["command"] == "fit" for r in runs)


def test_best_scores_are_metrics_at_their_step(two_runs):
    _, _, client, runs = two_runs
    run = runs[0]
    val_loss = metric_history(client, run.info.run_id, "val/loss")
    val_bpb = dict(metric_history(client, run.info.run_id, "val/bpb"))
    best_step, best_loss = min(val_loss, key=lambda sv: sv[1])
    assert metric_history(client, run.info.run_id, "best/val_loss")[-1] == (best_step, best_loss)
    assert metric_history(client, run.info.run_id, "best/val_bpb")[-1] == (best_step, val_bpb[best_step])


def test_samples_table_and_checkpoints_stored_once(two_runs):
    root, _, client, runs = two_runs
    run_id = runs[0].info.run_id
    table = json.loads(Path(client.download_artifacts(run_id, "samples.json", str(root / "dl"))).read_text())
    assert table["columns"] == ["step", "sample", "prompt"]
    assert [row[0] for row in table["data"]] == [6, 12]
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert not any(path.endswith(".ckpt") for path in artifacts) and "checkpoints" not in artifacts
    assert Path(runs[0].data.tags["best_checkpoint"]).is_file()
    assert Path(runs[0].data.tags["checkpoint_dir"], "last.ckpt").is_file()


def test_validate_and_test_without_shape_flags(two_runs):
    root, uri, client, runs = two_runs
    best = runs[0].data.tags["best_checkpoint"]
    with workdir(root):
        # No --config: every model field at its default, so the shape and the tokenizer come from the checkpoint.
        assert run_main("validate", "--data.path", "corpus.txt", "--ckpt_path", best, "--trainer.enable_progress_bar", "false") == 0
        assert run_main("test", "--data.path", "corpus.txt", "--ckpt_path", best, "--data.test_fraction", "0.1",
                        "--trainer.enable_progress_bar", "false") == 0
    scored = client.search_runs([runs[0].info.experiment_id], "tags.command != 'fit'", order_by=["start_time"])
    validate, test = scored
    assert validate.data.tags["command"] == "validate" and test.data.tags["command"] == "test"
    for run in scored:
        assert run.data.tags["source_run_id"] == runs[0].info.run_id
        assert run.data.tags["checkpoint"] == str(Path(best).resolve())
    assert validate.data.metrics["val/loss"] == pytest.approx(runs[0].data.metrics["best/val_loss"], rel=1e-5)
    assert "test/loss" in test.data.metrics


def test_test_without_a_test_split_says_so(two_runs, capsys):
    root, _, client, runs = two_runs
    n_runs = len(client.search_runs([runs[0].info.experiment_id]))
    with workdir(root):
        assert run_main("test", "--data.path", "corpus.txt", "--ckpt_path", runs[0].data.tags["best_checkpoint"]) == 2
    assert "there is no test split" in capsys.readouterr().err
    assert len(client.search_runs([runs[0].info.experiment_id])) == n_runs  # no run left behind


def test_a_user_error_after_the_run_started_leaves_no_failed_run(two_runs, capsys):
    root, _, client, runs = two_runs
    (root / "short.txt").write_text("too short", encoding="utf-8")
    n_runs = len(client.search_runs([runs[0].info.experiment_id]))
    with workdir(root):
        assert run_main("validate", "--data.path", "short.txt", "--ckpt_path", runs[0].data.tags["best_checkpoint"]) == 2
    assert "too short" in capsys.readouterr().err
    assert len(client.search_runs([runs[0].info.experiment_id])) == n_runs


def test_evaluate_equals_a_plain_loop_over_the_same_windows(two_runs):
    from lm_lightning.checkpoint import load_gpt
    from lm_lightning.evaluate import read_tokens
    from lm_lightning.tokenizer import EOT

    root, uri, client, runs = two_runs
    best = runs[0].data.tags["best_checkpoint"]
    text = english_text(3000)
    (root / "new.txt").write_text(text, encoding="utf-8")
    with workdir(root):
        out = run_cli("evaluate", "--ckpt_path", best, "--data.path", "new.txt", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)

    # The text's tokens as training reads them (line by line); scoring them is what is checked here.
    model, tokenizer = load_gpt(best)
    ids = torch.from_numpy(read_tokens(str(root / "new.txt"), tokenizer)[0])
    assert ids[0] == ids[-1] == tokenizer.token_to_id(EOT)
    block = model.config.block_size
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            window = ids[start : start + block + 1]
            logits = model(window[None, :-1])
            nats += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
    n_tokens = len(ids) - 1
    assert got["tokens"] == n_tokens
    assert got["bytes"] == len(text.encode("utf-8"))
    assert got["loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nats / n_tokens), rel=1e-5)

    run = client.get_run(got["mlflow_run_id"])
    assert run.data.tags["command"] == "evaluate"
    assert run.data.tags["source_run_id"] == runs[0].info.run_id
    assert run.data.metrics["eval/bpb"] == pytest.approx(got["bpb"])


def test_evaluate_stride_scores_every_token_once():
    from lm_lightning.evaluate import windows

    for n, block, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 1), (2, 16, 8)]:
        spans = windows(n, block, stride)
        scored = [t for begin, end, new in spans for t in range(end - new, end)]
        assert scored == list(range(n - 1))
        assert all(end - begin <= block and new <= end - begin for begin, end, new in spans)


def test_misspelt_flag_suggests_the_right_one(capsys):
    assert run_main("fit", "--trainer.max_step", "3") == 2
    assert "did you mean --trainer.max_steps?" in capsys.readouterr().err
    assert run_main("generate", "--ckpt_path", "x", "--max_new_token", "3") == 2
    assert "did you mean --max_new_tokens?" in capsys.readouterr().err


def test_predict_is_not_a_subcommand(capsys):
    assert run_main("predict") == 2
    assert "unknown subcommand 'predict'" in capsys.readouterr().err


def test_misspelt_subcommand_suggests_the_right_one(capsys):
    assert run_main("validat", "--ckpt_path", "x") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown subcommand 'validat': did you mean validate?") and err.count("\n") == 1


def test_test_split_is_carved_before_validation_and_old_caches_stay_valid(corpus, tmp_path):
    from lm_lightning.data.cache import TokenCache

    def cache(test_fraction: float) -> TokenCache:
        return TokenCache(str(corpus), tmp_path / "cache", None, 300, 0.1, "text", 10**6, 10**6, test_fraction)

    without = cache(0.0).build()
    assert "test_fraction" not in without and "test_tokens" not in without  # the format of caches before the split
    mtime = (cache(0.0).folder / "meta.json").stat().st_mtime_ns
    cache(0.0).build()
    assert (cache(0.0).folder / "meta.json").stat().st_mtime_ns == mtime  # still valid: not rebuilt
    with_test = cache(0.1).build()
    assert with_test["test_fraction"] == 0.1 and with_test["test_tokens"] > 0
    _, _, splits, _ = cache(0.1).open()
    assert set(splits) == {"train", "val", "test"}
    # Validation text stays the end of the source; the test split comes just before it.
    assert with_test["val_tokens"] == with_test["test_tokens"]  # one source: both are round(0.1 * its tokens)
    assert "test_fraction" not in cache(0.0).build()  # asked for none again: rebuilt without it


def test_a_given_run_name_wins_and_a_continued_run_keeps_its_own():
    from jsonargparse import Namespace

    from lm_lightning.tracking.names import name_run

    def config(**init_args) -> Namespace:
        logger = Namespace(class_path="lm_lightning.tracking.logger.MLflowLogger",
                           init_args=Namespace(run_name=None, run_id=None, tags=None, **init_args))
        return Namespace(config=None, model=Namespace(n_layer=4, n_embd=192, learning_rate=2e-3), trainer=Namespace(logger=logger))

    named, given, continued = config(), config(), config()
    given.trainer.logger.init_args.run_name = "mine"
    continued.trainer.logger.init_args.run_id = "abc"
    for c in (named, given, continued):
        name_run(c, "fit")
    assert named.trainer.logger.init_args.run_name.startswith("run-4x192-lr2e-3-")
    assert given.trainer.logger.init_args.run_name == "mine"
    assert continued.trainer.logger.init_args.run_name is None
    assert continued.trainer.logger.init_args.tags == {"command": "fit"}
