"""The user-error type: bad input that the user can fix, as opposed to a bug.

``lm-lightning`` shows a ``UserError`` as one line, ``error: ...``, with exit code 2 and no MLflow run
left behind; any other exception is a crash, shown with its traceback, and its MLflow run ends FAILED.
"""


class UserError(ValueError):
    """Bad input (a file, a setting, a checkpoint): the message names the problem and the fix."""


class ConfigError(UserError):
    """A setting that cannot work (a bad value, or two settings that contradict each other)."""


class RunError(RuntimeError):
    """A run that could not go on (the checkpoints it wrote are intact), e.g. a non-finite loss."""
