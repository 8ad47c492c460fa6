"""``lm-lightning sweep``: hyperparameter search with Optuna over any ``fit`` config key, each trial a child MLflow run.

``run``: the sweep (the study, the parent run, one ``fit`` process per trial); ``report``: the callback inside each
trial; ``settings`` and ``space``: what was asked, checked before any trial.
"""
