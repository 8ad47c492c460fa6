"""``lm-lightning sweep``: hyperparameter search with Optuna over any ``fit`` config key, each trial a child MLflow run."""

from lm_lightning.sweep.run import main

__all__ = ["main"]
