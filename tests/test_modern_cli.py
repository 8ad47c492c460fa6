"""The modern family through the CLI: what it refuses before tokenizing, and a model transformers has no class for."""

from mlflow.tracking import MlflowClient

from conftest import only_run, run_main


def test_muon_with_fsdp_is_refused_before_tokenizing(corpus, tiny_config, isolated, capsys):
    code = run_main(
        "fit", "--config", str(tiny_config), "--data.path", str(corpus),
        "--model.optimizer", "muon", "--trainer.strategy", "fsdp",
    )
    assert code == 2
    assert "needs whole weight matrices" in capsys.readouterr().err
    assert not (isolated / "cache").exists()


def test_bad_model_choices_are_one_line_before_tokenizing(corpus, tiny_config, isolated, capsys):
    for flags, expected in (
        (["--model.n_kv_head", "3"], "not divisible by n_kv_head=3"),
        (["--model.pos_embedding", "rope", "--model.n_embd", "35", "--model.n_head", "5"], "even head size"),
    ):
        assert run_main("fit", "--config", str(tiny_config), "--data.path", str(corpus), *flags) == 2
        assert expected in capsys.readouterr().err
    assert not (isolated / "cache").exists()


def test_relu2_fit_finishes_without_a_servable_model(corpus, tiny_config, mlflow_store):
    code = run_main(
        "fit", "--config", str(tiny_config), "--data.path", str(corpus), "--trainer.max_steps", "10",
        "--model.mlp", "relu2", "--model.logit_softcap", "15", "--trainer.logger.init_args.experiment_name", "relu2",
    )
    assert code == 0
    client = MlflowClient(mlflow_store)
    run = only_run(client, "relu2")
    assert run.info.status == "FINISHED"
    assert "best_checkpoint" in run.data.tags
    assert not client.get_run(run.info.run_id).outputs.model_outputs
