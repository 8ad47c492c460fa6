"""LoRA: adapters on a frozen pretrained model, the optimizer holding them only, checkpoints without the base,
exact resume, merged loading and one-line refusals; real transformers folders, real runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import metric_history, only_run, run_cli, run_main, single_thread
from lm_lightning.checkpoint import load_checkpoint
from lm_lightning.errors import UserError
from lm_lightning.lora import LORA_KEY, LoRALinear, lora_layers, merged
from lm_lightning.module import LanguageModel
from lm_lightning.pretrained import load_source
from test_pretrained import FINETUNE, TEXT, fit_args, make_folder

pytest.importorskip("transformers")
LORA = ["--model.lora_r", "4", "--model.lora_alpha", "8", "--model.lora_targets", "[attention, mlp]"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {family: make_folder(family, root / family) for family in ("gpt2", "llama")}


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("targets, layers, dtype", [
    (("attention",), {"attn.c_attn", "attn.c_proj"}, torch.bfloat16),
    (("all",), {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}, torch.float32),
])
def test_adapters_train_alone_and_the_optimizer_holds_them_only(folders, targets, layers, dtype):
    base_dtype = str(dtype).removeprefix("torch.")
    optimizer = "muon" if dtype == torch.float32 else "adamw"  # Muon's matrices are frozen: adapters go to its AdamW
    module = LanguageModel(init_from=str(folders["llama"]), lora_r=4, lora_targets=targets, base_dtype=base_dtype, optimizer=optimizer)
    adapted = lora_layers(module.model)
    assert {name.split(".", 3)[3] for name in adapted} == layers and len(adapted) == 2 * len(layers)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(m.weight.dtype == dtype and m.lora_A.dtype == torch.float32 for m in adapted.values())
    module.trainer = type("T", (), {"precision": "32-true", "estimated_stepping_batches": 10})()
    optimizer = module.configure_optimizers()["optimizer"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.model.parameters() if p.requires_grad}
    # B = 0 at the start: the adapted model is the base's function; merged() folds B A into the weights.
    x = torch.randint(0, 100, (2, 16))
    base, _, _ = load_source(folders["llama"])
    with torch.no_grad():
        for m in adapted.values():
            m.lora_B.normal_(std=0.05)
        plain = merged(module.model.eval())
        tolerance = 1e-4 if dtype == torch.float32 else 0.05  # a bf16 base rounds the weights
        torch.testing.assert_close(plain(x), module.model(x), rtol=tolerance, atol=tolerance)
        assert not torch.allclose(plain(x), base(x), atol=1e-2)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())


@pytest.mark.parametrize("extra, needle", [
    (["--model.lora_r", "-1"], "model.lora_r=-1"),
    (["--model.lora_r", "4", "--model.lora_targets", "[attn]"], "unknown 'attn'"),
])
def test_bad_lora_settings_are_one_line(folders, corpus, extra, needle, capsys, mlflow_store):
    assert run_main(*fit_args(folders["gpt2"], corpus, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_lora_without_a_source_is_refused():
    with pytest.raises(UserError, match="set model.init_from"):
        LanguageModel(lora_r=8, vocab_size=100)


def test_checkpoint_holds_adapters_resumes_exactly_and_finds_its_base(folders, corpus, tmp_path, mlflow_store, capsys):
    folder = tmp_path / "base"
    shutil.copytree(folders["gpt2"], folder)
    steps = ["--trainer.max_steps", "8", "--trainer.val_check_interval", "8", "--model.lora_dropout", "0.1",
             "--model.warmup_steps", "2", "--model.learning_rate", "1e-2", "--model.lr_decay_steps", "8", "--last_checkpoint.every_n_train_steps", "4"]
    client = MlflowClient(mlflow_store)
    with single_thread():
        assert run_main(*fit_args(folder, corpus, *LORA, *steps, "--trainer.logger.init_args.experiment_name", "straight",
                                  "--trainer.default_root_dir", "straight")) == 0
        straight = only_run(client, "straight")
        (ckpt,) = Path("straight").glob("**/last.ckpt")
        checkpoint = load_checkpoint(ckpt)
        model_keys = [k for k in checkpoint["state_dict"] if k.startswith("model.")]
        assert model_keys and all(".lora_" in k for k in model_keys)
        assert checkpoint[LORA_KEY]["path"] == str(folder.resolve()) and len(checkpoint[LORA_KEY]["sha256"]) == 64
        assert straight.data.params["model.lora_r"] == "4"
        assert int(straight.data.tags["trainable_params"]) < int(straight.data.tags["total_params"]) / 5

        half = [*steps[:1], "4", *steps[2:]]
        first = fit_args(folder, corpus, *LORA, *half, "--trainer.logger.init_args.experiment_name", "resumed",
                         "--trainer.default_root_dir", "resumed")
        assert run_main(*first) == 0
        (half_ckpt,) = Path("resumed").glob("**/last.ckpt")
        assert run_main(*fit_args(folder, corpus, *LORA, *steps, "--trainer.logger.init_args.experiment_name", "resumed",
                                  "--trainer.default_root_dir", "resumed", "--ckpt_path", str(half_ckpt))) == 0
    expected = [loss for _, loss in metric_history(client, straight.info.run_id, "train/loss")]
    (resumed,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    # The same losses in the same order (a run continued from its end-of-run checkpoint labels its first step
    # one lower: the step labels are Lightning's logging, the values the training).
    assert len(expected) == 8 and [loss for _, loss in metric_history(client, resumed.info.run_id, "train/loss")] == expected

    # generate/evaluate load the merged model; it differs from the base (the adapters trained).
    model, _, info = load_source(ckpt)
    base, _, _ = load_source(folder)
    x = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert info.kind == "lora" and not torch.allclose(model(x), base(x), atol=1e-3)
    assert run_main("generate", "--ckpt_path", str(ckpt), "--prompt", "the", "--max_new_tokens", "4") == 0
    with single_thread():  # validate finds the base too, and scores the run's best (last) model as the run did
        assert run_main("validate", "--config", str(FINETUNE), "--data.path", str(corpus), "--ckpt_path", str(ckpt),
                        "--trainer.limit_val_batches", "2", "--data.batch_size", "4", "--trainer.precision", "32-true",
                        "--trainer.logger.init_args.experiment_name", "validated") == 0
    (validated,) = client.search_runs([client.get_experiment_by_name("validated").experiment_id])
    assert validated.data.metrics["val/bpb"] == pytest.approx(straight.data.metrics["val/bpb"], abs=1e-5)
    capsys.readouterr()

    # A base that changed or moved is one line naming it.
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert run_main("generate", "--ckpt_path", str(ckpt), "--prompt", "the") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since the run" in err[0] and str(folder.resolve()) in err[0]
    shutil.rmtree(folder)
    assert run_main("generate", "--ckpt_path", str(ckpt), "--prompt", "the") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and str(folder.resolve()) in err[0]


def test_ddp_trains_adapters_in_two_processes(folders, corpus, tmp_path):
    done = run_cli(*fit_args(folders["gpt2"], corpus, *LORA, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                             "--trainer.accelerator", "cpu", "--trainer.logger.init_args.experiment_name", "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.lora_r"] == "4"
    (ckpt,) = Path("runs").glob("*/*/checkpoints/last.ckpt")
    model_keys = [k for k in load_checkpoint(ckpt)["state_dict"] if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    assert load_source(ckpt)[2].kind == "lora"
